"""The knowledge store on the real engines: Qdrant Edge (shard folder) and qdrant-client local mode (url)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fedrag_app.core.errors import StoreError
from fedrag_app.rag.knowledge_store import KnowledgeStore


@pytest.fixture(scope="module")
def vectors(retriever, small_passages):
    return retriever.encode_passages([f"{p.title}\n{p.text}" for p in small_passages[:120]])


@pytest.fixture(scope="module")
def queries(retriever):
    return retriever.encode_queries(
        [
            "who was the first president of the united states",
            "what is the capital of france",
            "when did world war 2 end",
        ]
    ).numpy()


def fill(store, passages, vectors):
    store.add([p.id for p in passages], vectors, [p.title for p in passages], [p.text for p in passages])
    store.finalize()


def test_edge_and_server_backends_return_the_same_top_k(tmp_path, small_passages, vectors, queries):
    passages = small_passages[:120]
    with (
        KnowledgeStore.create(path=tmp_path / "edge", embedding_model="m", dim=384) as edge,
        KnowledgeStore.create(url=":memory:", embedding_model="m", dim=384) as server,
    ):
        fill(edge, passages, vectors)
        fill(server, passages, vectors)
        assert edge.count() == server.count() == 120
        for a, b in zip(edge.search_batch(queries, 5), server.search_batch(queries, 5)):
            assert [h.id for h in a] == [h.id for h in b]
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_search_matches_exact_cosine_and_batched_equals_single(tmp_path, small_passages, vectors, queries):
    passages = small_passages[:120]
    with KnowledgeStore.create(path=tmp_path / "s", embedding_model="m", dim=384) as store:
        fill(store, passages, vectors)
        exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :4]  # (3, 4)
        batched = store.search_batch(queries, 4, with_vectors=True)
        for q, hits, best in zip(queries, batched, exact):
            assert [h.id for h in hits] == [passages[i].id for i in best]
            assert [h.id for h in store.search(q, 4)] == [h.id for h in hits]
            np.testing.assert_allclose(hits[0].vector, vectors[best[0]], atol=1e-6)
            assert hits[0].title == passages[best[0]].title and hits[0].text == passages[best[0]].text


def test_exact_search_is_the_brute_force_top_k_where_the_hnsw_graph_is_not(tmp_path):
    """A segment past Qdrant's indexing threshold gets an HNSW graph, and on random 384-d points the graph's top 10
    is approximate; exact=True scans every point, on both engines, so its top 10 is numpy's whatever graph the
    store was built with (qdrant-client's local mode always scans)."""
    rng = np.random.default_rng(0)
    points = rng.standard_normal((10_000, 384)).astype(np.float32)  # 15 MB: indexed (3,000 are not)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    asked = rng.standard_normal((50, 384)).astype(np.float32)
    asked /= np.linalg.norm(asked, axis=1, keepdims=True)
    best = [[f"p{i}" for i in row] for row in np.argsort(-(asked @ points.T), axis=1)[:, :10]]
    ids = [f"p{i}" for i in range(len(points))]
    with (
        KnowledgeStore.create(path=tmp_path / "edge", embedding_model="m", dim=384) as edge,
        KnowledgeStore.create(url=":memory:", embedding_model="m", dim=384) as server,
    ):
        for store in (edge, server):
            store.add(ids, points, ids, ids)
            store.finalize()
            assert [[h.id for h in hits] for hits in store.search_batch(asked, 10, exact=True)] == best
        graph = [[h.id for h in hits] for hits in edge.search_batch(asked, 10)]
        assert graph != best, "precondition: the graph search is approximate here (it misses in most lists)"


def test_shard_persists_and_reopens(tmp_path, small_passages, vectors, queries):
    passages = small_passages[:120]
    with KnowledgeStore.create(path=tmp_path / "s", embedding_model="m", dim=384) as store:
        fill(store, passages, vectors)
        before = [h.id for h in store.search(queries[0], 3)]
    with KnowledgeStore.open(path=tmp_path / "s", embedding_model="m", dim=384) as store:
        assert store.count() == 120 and [h.id for h in store.search(queries[0], 3)] == before


def test_opening_with_another_retriever_or_dimension_is_an_error(small_shard_path):
    with pytest.raises(StoreError, match="built with retriever 'all-minilm-l6-v2', not 'other-model'"):
        KnowledgeStore.open(path=small_shard_path, embedding_model="other-model", dim=384)
    with pytest.raises(StoreError, match="384-d vectors, but the retriever makes 768-d"):
        KnowledgeStore.open(path=small_shard_path, embedding_model="all-minilm-l6-v2", dim=768)
    KnowledgeStore.open(path=small_shard_path, embedding_model="all-minilm-l6-v2", dim=384).close()  # lock released


def test_server_store_checks_the_model_too():
    store = KnowledgeStore.create(url=":memory:", embedding_model="m", dim=4)
    store.finalize()
    assert store._backend.metadata()["embedding_model"] == "m"
    store.close()


def test_a_second_process_cannot_open_an_open_shard(small_shard_path):
    with KnowledgeStore.open(path=small_shard_path):
        code = (
            f"from fedrag_app.rag.knowledge_store import KnowledgeStore\nKnowledgeStore.open(path={small_shard_path!r})"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert "already open in another process" in proc.stderr and small_shard_path in proc.stderr


def test_an_incomplete_store_is_refused(tmp_path):
    store = KnowledgeStore.create(path=tmp_path / "half", embedding_model="m", dim=4)
    store.add(["a"], np.ones((1, 4), np.float32), ["t"], ["x"])
    store.close()  # never finalized: a crashed build
    assert json.loads((tmp_path / "half" / "manifest.json").read_text())["complete"] is False
    with pytest.raises(StoreError, match="incomplete"):
        KnowledgeStore.open(path=tmp_path / "half")


def test_missing_store_and_bad_locations_are_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="not a knowledge store"):
        KnowledgeStore.open(path=tmp_path / "nothing")
    with pytest.raises(StoreError, match="exactly one of"):
        KnowledgeStore.open(path=tmp_path, url=":memory:")
    with pytest.raises(StoreError, match="cannot reach the Qdrant server"):
        KnowledgeStore.open(url="http://127.0.0.1:9")
    with pytest.raises(StoreError, match="do not fit"):
        with KnowledgeStore.create(url=":memory:", embedding_model="m", dim=4) as s:
            s.search_batch(np.zeros((1, 3), np.float32), 1)


def test_a_store_refuses_a_context_encoder_with_other_weights(retriever, small_shard_path):
    """A shard records the fingerprint of the context encoder that made its vectors; a trained (changed) context
    encoder opening it is a StoreError, not a silent search of stale vectors."""
    import torch

    built = retriever.context_fingerprint()
    with KnowledgeStore.open(
        path=small_shard_path, embedding_model=retriever.name, dim=retriever.dim, context_fingerprint=built
    ) as store:
        assert store.count() > 0
    param = next(retriever.context_model.parameters())
    saved = param.detach().clone()
    try:
        retriever.train_context = True  # a trainable context encoder: the fingerprint is recomputed
        with torch.no_grad():
            param.add_(1e-3)
        changed = retriever.context_fingerprint()
        assert changed != built
        with pytest.raises(StoreError, match="stale"):
            KnowledgeStore.open(
                path=small_shard_path, embedding_model=retriever.name, dim=retriever.dim, context_fingerprint=changed
            )
    finally:
        with torch.no_grad():
            param.copy_(saved)
        retriever.train_context = False
    assert retriever.context_fingerprint() == built
