"""Retrieval written once: questions encoded by the query encoder and searched in a knowledge store, in batches."""

from __future__ import annotations

from fedrag_app.core.errors import StoreError
from fedrag_app.rag.knowledge_store import Hit, KnowledgeStore
from fedrag_app.rag.prompts import format_passage
from fedrag_app.rag.retriever import DualEncoder

QUERY_BATCH = 64


def retrieve(
    retriever: DualEncoder, store: KnowledgeStore, questions: list[str], top_k: int, *, with_vectors: bool = False
) -> list[list[Hit]]:
    """Top-k hits for every question: queries encoded and searched in batches (or, for a source that searches text
    itself, an MCP server's: rag/mcp_source.py, sent the questions)."""
    if getattr(store, "searches_text", False):
        if with_vectors:
            raise StoreError(f"{store.embedding_model} returns no passage vectors: training needs a local store")
        return store.search_texts(questions, top_k)
    hits: list[list[Hit]] = []
    for start in range(0, len(questions), QUERY_BATCH):
        queries = retriever.encode_queries(questions[start : start + QUERY_BATCH]).cpu().numpy()  # (b, D)
        hits.extend(store.search_batch(queries, top_k, with_vectors=with_vectors))
    return hits


def prompt_contexts(hits: list[list[Hit]] | None, n: int, top_k: int) -> list[list[str]]:
    """Per question, the top-k passages as a prompt shows them (title, then text); n empty lists without retrieval."""
    if hits is None:
        return [[] for _ in range(n)]
    return [[format_passage(h.title, h.text) for h in hs[:top_k]] for hs in hits]
