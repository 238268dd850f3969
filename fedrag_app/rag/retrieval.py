"""Retrieval written once: questions encoded by the query encoder and searched in a knowledge store, in batches."""

from __future__ import annotations

from fedrag_app.rag.knowledge_store import Hit, KnowledgeStore
from fedrag_app.rag.retriever import DualEncoder

QUERY_BATCH = 64


def retrieve(
    retriever: DualEncoder, store: KnowledgeStore, questions: list[str], top_k: int, *, with_vectors: bool = False
) -> list[list[Hit]]:
    """Top-k hits for every question: queries encoded and searched in batches."""
    hits: list[list[Hit]] = []
    for start in range(0, len(questions), QUERY_BATCH):
        queries = retriever.encode_queries(questions[start : start + QUERY_BATCH]).cpu().numpy()  # (b, D)
        hits.extend(store.search_batch(queries, top_k, with_vectors=with_vectors))
    return hits
