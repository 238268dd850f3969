"""`fedrag-app index` and the store check of `ask`, in process: bad input fails before any model loads, and the
index goes through the embedding cache with a determinate progress bar."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedrag_app.cli import app
from fedrag_app.core.errors import DataError, StoreError


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model is a failure here: these errors must come before the models load (~20 s)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("fedrag_app.rag.generator.load_generator", refuse)
    monkeypatch.setattr("fedrag_app.rag.retriever.load_retriever", refuse)


def test_ask_checks_the_store_before_loading_the_models(tmp_path, no_models):
    result = CliRunner().invoke(app, ["ask", "who?", "--store", str(tmp_path / "none")])
    assert isinstance(result.exception, StoreError), result.output
    assert "not a knowledge store" in str(result.exception) and "fedrag-app index" in str(result.exception)
    half = tmp_path / "half"
    half.mkdir()
    (half / "manifest.json").write_text(json.dumps({"embedding_model": "m", "dim": 4, "complete": False}))
    result = CliRunner().invoke(app, ["ask", "who?", "--store", str(half)])
    assert isinstance(result.exception, StoreError) and "incomplete" in str(result.exception)


def test_index_refuses_an_empty_or_non_utf8_corpus_before_loading_a_model(tmp_path, no_models):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = CliRunner().invoke(app, ["index", str(empty), "--store", str(tmp_path / "s")])
    assert isinstance(result.exception, DataError) and "no passages" in str(result.exception)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"id": "a", "title": "Caf\xe9", "text": "x"}\n')
    result = CliRunner().invoke(app, ["index", str(latin1), "--store", str(tmp_path / "s")])
    assert isinstance(result.exception, DataError) and "latin1.jsonl:1: not UTF-8" in str(result.exception)
    assert not (tmp_path / "s").exists()


def test_index_fills_the_embedding_cache_and_a_rebuild_encodes_nothing(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("FEDRAG_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "passages.jsonl"
    with open(data_dir / "wikipedia" / "passages.jsonl", encoding="utf-8") as f:
        corpus.write_text("".join(next(f) for _ in range(40)), encoding="utf-8")
    store = tmp_path / "shard"
    result = CliRunner().invoke(app, ["index", str(corpus), "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert "0 of 40 passages already in the embedding cache" in result.output
    assert "40/40" in result.output and "40 passages" in result.output  # a bar with its total
    [cached] = (tmp_path / "cache" / "embeddings").iterdir()
    assert len(list(cached.glob("chunk-*.npz"))) == 1
    again = CliRunner().invoke(app, ["index", str(corpus), "--store", str(store), "--rebuild"])
    assert again.exit_code == 0, again.output
    assert "already in the embedding cache" not in again.output and "40 from the embedding cache" in again.output
