"""The embedding cache on the real encoder and the real corpus's first passages: same vectors as encoding directly,
filled lazily, resumed after a crash, keyed by corpus bytes and encoder weights, and shards built from it encode
nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedrag_app.core.errors import StoreError
from fedrag_app.rag.embedding_cache import EmbeddingCache
from fedrag_app.rag.ingest import build_shard
from fedrag_app.rag.knowledge_store import KnowledgeStore
from fedrag_app.rag.prompts import format_passage
from fedrag_app.rag.retriever import context_encoder_fingerprint


class CountingEncoder:
    """The real encoder, counting the passages it encodes; it can be told to crash after some calls."""

    def __init__(self, encoder, fail_after: int | None = None):
        self.encoder, self.fail_after, self.calls, self.texts = encoder, fail_after, 0, 0

    def __getattr__(self, name):  # name, dim, context_model: the real encoder's
        return getattr(self.encoder, name)

    def encode_passages(self, texts, **kw):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        self.texts += len(texts)
        return self.encoder.encode_passages(texts, **kw)


@pytest.fixture
def corpus(tmp_path, data_dir, monkeypatch):
    """A corpus file of the real corpus's first 120 lines; the cache goes under a temp FEDRAG_CACHE_DIR."""
    monkeypatch.setenv("FEDRAG_CACHE_DIR", str(tmp_path / "cache"))
    with open(data_dir / "wikipedia" / "passages.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(120)]
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_cached_vectors_equal_direct_encoding_and_only_missing_passages_are_encoded(
    corpus, tmp_path, retriever, small_passages
):
    counting = CountingEncoder(retriever)
    cache = EmbeddingCache.open(corpus, counting)
    assert cache.folder.parent == tmp_path / "cache" / "embeddings"
    first = cache.vectors(small_passages[:40], chunk_size=16)
    assert counting.texts == 40 and len(list(cache.folder.glob("chunk-*.npz"))) == 3
    both = cache.vectors(small_passages[20:70])  # 20 cached, 30 new
    assert counting.texts == 70
    direct = retriever.encode_passages([format_passage(p.title, p.text) for p in small_passages[:70]], batch_size=16)
    np.testing.assert_allclose(first, direct[:40], atol=1e-5)
    np.testing.assert_allclose(both, direct[20:70], atol=1e-5)
    again = EmbeddingCache.open(corpus, counting)  # another process: reads the chunk files, encodes nothing
    np.testing.assert_array_equal(again.vectors(small_passages[:70]), np.concatenate([first, both[20:]]))
    assert counting.texts == 70 and len(again) == 70


def test_an_interrupted_encoding_resumes_from_the_chunks_already_written(corpus, retriever, small_passages):
    with pytest.raises(KeyboardInterrupt):
        EmbeddingCache.open(corpus, CountingEncoder(retriever, fail_after=2)).fill(small_passages[:60], chunk_size=20)
    resumed = CountingEncoder(retriever)
    cache = EmbeddingCache.open(corpus, resumed)
    assert len(cache) == 40 and not list(cache.folder.glob(".chunk-*"))
    assert cache.fill(small_passages[:60], chunk_size=20) == 20 and resumed.texts == 20


def test_the_key_follows_the_corpus_bytes_and_the_encoder_weights(corpus, retriever):
    key = EmbeddingCache.open(corpus, retriever).key
    assert EmbeddingCache.open(corpus, retriever).key == key
    corpus.write_text(corpus.read_text(encoding="utf-8").replace("Anarchism", "Anarchy", 1), encoding="utf-8")
    assert EmbeddingCache.open(corpus, retriever).key.split("-")[0] != key.split("-")[0]
    before = context_encoder_fingerprint(retriever)
    param = next(retriever.context_model.parameters())
    saved = param.detach().clone()
    with torch.no_grad():
        param[0, 0] += 1e-4  # one weight of the context encoder
    try:
        assert context_encoder_fingerprint(retriever) != before
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert context_encoder_fingerprint(retriever) == before


def test_a_shard_and_the_cache_name_the_context_encoder_by_one_fingerprint(corpus, retriever):
    """The fingerprint a shard records (and a node checks query vectors against) is the one the cache is keyed by."""
    cache = EmbeddingCache.open(corpus, retriever)
    assert (
        retriever.context_fingerprint() == cache.meta["encoder-fingerprint"] == context_encoder_fingerprint(retriever)
    )
    assert cache.key.endswith("-" + retriever.context_fingerprint()[:16])


def test_a_passage_that_is_not_the_corpus_one_is_refused(corpus, retriever, small_passages):
    from fedrag_app.data.loaders import Passage

    cache = EmbeddingCache.open(corpus, retriever)
    cache.fill(small_passages[:2])
    forged = Passage(small_passages[0].id, small_passages[0].title, "some other text")
    with pytest.raises(StoreError, match="differs from the one cached"):
        cache.vectors([forged])


def test_a_shard_built_from_cached_vectors_calls_no_encoder(corpus, tmp_path, retriever, small_passages):
    passages = small_passages[:50]
    first = CountingEncoder(retriever)
    stats = build_shard(
        passages, first, path=str(tmp_path / "a"), progress=False, cache=EmbeddingCache.open(corpus, first)
    )
    assert first.texts == 50 and stats.encoded == 50
    second = CountingEncoder(retriever)
    stats = build_shard(
        passages, second, path=str(tmp_path / "b"), progress=False, cache=EmbeddingCache.open(corpus, second)
    )
    assert second.calls == 0 and stats.encoded == 0
    query = retriever.encode_queries(["anarchism political philosophy"]).numpy()[0]
    with KnowledgeStore.open(path=tmp_path / "a") as a, KnowledgeStore.open(path=tmp_path / "b") as b:
        hits_a, hits_b = a.search(query, 5, with_vectors=True), b.search(query, 5, with_vectors=True)
        assert [h.id for h in hits_a] == [h.id for h in hits_b] and b.count() == 50
    by_id = {p.id: p for p in passages}
    direct = retriever.encode_passages([format_passage(by_id[h.id].title, by_id[h.id].text) for h in hits_b])
    np.testing.assert_allclose(np.stack([h.vector for h in hits_b]), direct, atol=1e-5)


def test_the_default_store_is_built_on_demand_from_the_cache_and_a_configured_one_is_not(
    corpus, tmp_path, retriever, small_passages
):
    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.rag.pipeline import open_store

    counting = CountingEncoder(retriever)
    EmbeddingCache.open(corpus, counting).fill(small_passages[:30])  # e.g. by `fedrag-app partition`
    cfg = AppConfig.from_flat({"data.corpus": str(corpus), "store.passages-limit": 30})
    with open_store(cfg, counting) as store:  # what the server's evaluation opens
        assert store.count() == 30 and counting.texts == 30
    manifest = tmp_path / "cache" / "shards" / "passages-first30-all-minilm-l6-v2" / "manifest.json"
    assert manifest.exists()
    # built by other context-encoder weights (or before the fingerprint was the cache's key): the default shard is
    # rebuilt from the cached vectors, encoding nothing, instead of refused
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, "context_fingerprint": "0" * 16}))
    with open_store(cfg, counting) as store:
        assert store.count() == 30 and counting.texts == 30
    assert json.loads(manifest.read_text())["context_fingerprint"] == retriever.context_fingerprint()
    with pytest.raises(StoreError, match="not a knowledge store"):
        open_store(AppConfig.from_flat({"data.corpus": str(corpus), "store.path": str(tmp_path / "mine")}), counting)
