"""Ingestion: real encoder, real Qdrant Edge; an interrupted build never looks complete."""

import pytest

from fedrag_app.errors import StoreError
from fedrag_app.ingest import build_shard, iter_store_passages, reindex
from fedrag_app.knowledge_store import KnowledgeStore


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
        build_shard(small_passages[:60], FailingEncoder(retriever, 1), path=str(target), batch_size=20, chunk_size=20,
                    progress=False)
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
