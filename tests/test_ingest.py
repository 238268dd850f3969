"""Ingestion: real encoder, real Qdrant Edge; an interrupted build never looks complete."""

import pytest

from fedrag_app.core.errors import StoreError
from fedrag_app.rag.ingest import build_shard, iter_store_passages, reindex
from fedrag_app.rag.knowledge_store import KnowledgeStore


class FailingEncoder:
    """The real encoder, which raises after a number of batches (a crash mid-build)."""

    def __init__(self, encoder, fail_after: int):
        self.encoder, self.left = encoder, fail_after
        self.name, self.dim = encoder.name, encoder.dim

    def encode_passages(self, texts, **kw):
        if self.left == 0:
            raise KeyboardInterrupt("simulated crash")
        self.left -= 1
        return self.encoder.encode_passages(texts, **kw)


def test_interrupted_build_leaves_nothing_that_opens_and_a_rerun_succeeds(tmp_path, retriever, small_passages):
    target = tmp_path / "shard"
    with pytest.raises(KeyboardInterrupt):
        build_shard(
            small_passages[:60],
            FailingEncoder(retriever, 1),
            path=str(target),
            batch_size=20,
            chunk_size=20,
            progress=False,
        )
    assert not target.exists() and list(tmp_path.iterdir()) == []
    stats = build_shard(small_passages[:60], retriever, path=str(target), batch_size=20, progress=False)
    assert stats.passages == 60
    with KnowledgeStore.open(path=target, embedding_model=retriever.name, dim=retriever.dim) as store:
        assert store.count() == 60


def test_existing_shard_is_not_overwritten_by_accident(small_shard_path, retriever, small_passages):
    with pytest.raises(StoreError, match="already exists"):
        build_shard(small_passages[:5], retriever, path=small_shard_path, progress=False)


def test_ingest_into_a_server_collection(retriever, small_passages):
    stats = build_shard(small_passages[:40], retriever, url=":memory:", batch_size=16, progress=False)
    assert stats.passages == 40 and stats.encode_s > 0


def test_reindex_rebuilds_from_stored_passages(tmp_path, retriever, small_passages):
    target = tmp_path / "shard"
    build_shard(small_passages[:30], retriever, path=str(target), progress=False)
    stored = sorted(p.id for p in iter_store_passages(str(target)))
    assert stored == sorted(p.id for p in small_passages[:30])
    stats = reindex(str(target), retriever, progress=False)
    assert stats.passages == 30
    with KnowledgeStore.open(path=target) as store:
        assert store.count() == 30


def test_an_interrupted_index_resumes_from_the_embedding_cache(
    tmp_path, monkeypatch, retriever, small_passages, data_dir
):
    from fedrag_app.rag.embedding_cache import EmbeddingCache
    from tests.test_embedding_cache import CountingEncoder

    monkeypatch.setenv("FEDRAG_CACHE_DIR", str(tmp_path / "cache"))
    corpus = data_dir / "wikipedia" / "passages.jsonl"  # read for its hash only; nothing is written beside it
    target, passages = tmp_path / "shard", small_passages[:60]
    crashing = CountingEncoder(retriever, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        build_shard(
            passages,
            crashing,
            path=str(target),
            chunk_size=20,
            progress=False,
            cache=EmbeddingCache.open(corpus, crashing),
        )
    assert not target.exists()
    resumed = CountingEncoder(retriever)
    stats = build_shard(
        passages, resumed, path=str(target), chunk_size=20, progress=False, cache=EmbeddingCache.open(corpus, resumed)
    )
    assert resumed.texts == 20 and stats.encoded == 20 and stats.passages == 60
    with KnowledgeStore.open(path=target) as store:
        assert store.count() == 60


def test_a_killed_builds_folder_is_removed_and_a_live_ones_kept(tmp_path, retriever, small_passages):
    import json
    import os
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, fresh = (tmp_path / f".shard.building-{n}" for n in ("stale", "live", "fresh"))
    for folder, pid in ((stale, dead.pid), (live, os.getpid())):
        folder.mkdir()
        (folder / "builder.json").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    fresh.mkdir()  # no builder.json yet (its builder just started): kept while young
    build_shard(small_passages[:5], retriever, path=str(tmp_path / "shard"), progress=False)
    assert not stale.exists() and live.exists() and fresh.exists()
    os.utime(fresh, (0, 0))  # a folder nobody claimed, long ago
    build_shard(small_passages[:5], retriever, path=str(tmp_path / "shard"), progress=False, replace=True)
    assert not fresh.exists() and live.exists()


def test_no_passages_is_an_error_not_an_empty_store(tmp_path, retriever):
    from fedrag_app.core.errors import DataError

    with pytest.raises(DataError, match="no passages"):
        build_shard([], retriever, path=str(tmp_path / "shard"), progress=False)
    with pytest.raises(DataError, match="no passages"):
        build_shard(iter([]), retriever, path=str(tmp_path / "shard"), progress=False)
    assert list(tmp_path.iterdir()) == []
