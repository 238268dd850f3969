"""The RAG pipeline: retrieve top-k (one batched encode, one batched search) -> shared prompt -> greedy answer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedrag_app.config import AppConfig
from fedrag_app.generator import Generator, generate
from fedrag_app.knowledge_store import Hit, KnowledgeStore
from fedrag_app.model_sources import cache_dir
from fedrag_app.prompts import build_prompt, format_passage
from fedrag_app.retriever import DualEncoder


@dataclass(frozen=True)
class RagAnswer:
    question: str
    answer: str
    hits: list[Hit]


def store_location(cfg: AppConfig) -> dict[str, str]:
    """``{"url": ...}`` for a Qdrant server, else ``{"path": ...}``: the configured folder or a default per corpus+retriever."""
    if cfg.store.url:
        return {"url": cfg.store.url, "collection": cfg.store.collection}
    if cfg.store.path:
        return {"path": str(Path(cfg.store.path).expanduser().resolve())}
    corpus = Path(cfg.data.corpus).stem if cfg.data.corpus else "wikipedia"
    limit = f"-first{cfg.store.passages_limit}" if cfg.store.passages_limit else ""
    name = f"{corpus}{limit}-{Path(cfg.retriever.context_model or cfg.retriever.model).name}"
    return {"path": str(cache_dir() / "shards" / name)}


def open_store(cfg: AppConfig, retriever: DualEncoder) -> KnowledgeStore:
    """Open the configured shard, checked against the retriever that will query it."""
    return KnowledgeStore.open(**store_location(cfg), embedding_model=retriever.name, dim=retriever.dim,
                               context_fingerprint=retriever.context_fingerprint())


class RagPipeline:
    """Retrieval + generation with the one prompt template that training also uses."""

    def __init__(self, generator: Generator, retriever: DualEncoder, store: KnowledgeStore | None, top_k: int):
        self.generator, self.retriever, self.store, self.top_k = generator, retriever, store, top_k

    def retrieve(self, questions: list[str], top_k: int | None = None, *, with_vectors: bool = False) -> list[list[Hit]]:
        """Top-k hits per question; an empty list each when there is no store or k = 0 (closed book)."""
        k = self.top_k if top_k is None else top_k
        if self.store is None or k == 0:
            return [[] for _ in questions]
        queries = self.retriever.encode_queries(questions).cpu().numpy()  # (B, D)
        return self.store.search_batch(queries, k, with_vectors=with_vectors)

    def prompts(self, questions: list[str], hits: list[list[Hit]]) -> list[str]:
        tok = self.generator.tokenizer
        return [build_prompt(tok, q, [format_passage(h.title, h.text) for h in hs]) for q, hs in zip(questions, hits)]

    def answer(self, questions: list[str], *, max_new_tokens: int = 32, batch_size: int = 8) -> list[RagAnswer]:
        hits = self.retrieve(questions)
        answers = generate(self.generator, self.prompts(questions, hits), max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
        return [RagAnswer(q, a, h) for q, a, h in zip(questions, answers, hits)]
