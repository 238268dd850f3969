"""The RAG pipeline: retrieve top-k (one batched encode, one batched search) -> shared prompt -> greedy answer."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.errors import DataError, StoreError
from fedrag_app.data.loaders import Passage, corpus_path, load_passages
from fedrag_app.rag.embedding_cache import EmbeddingCache
from fedrag_app.rag.generator import Generator, generate
from fedrag_app.rag.ingest import IndexStats, build_shard
from fedrag_app.rag.knowledge_store import MANIFEST, Hit, KnowledgeStore
from fedrag_app.rag.prompts import build_prompt, format_passage
from fedrag_app.rag.retrieval import retrieve
from fedrag_app.rag.retriever import DualEncoder
from fedrag_app.rag.store_location import is_default_location, store_location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RagAnswer:
    question: str
    answer: str
    hits: list[Hit]


def build_store(
    cfg: AppConfig,
    retriever: DualEncoder,
    *,
    passages: list[Passage] | None = None,
    progress: bool = True,
    replace: bool = False,
) -> IndexStats:
    """Index the corpus (or its first store.passages-limit passages) into the configured store, vectors through the
    embedding cache: what is cached is not encoded again, by this store or any other built from the same corpus."""
    if passages is None:
        passages = load_passages(cfg.data, limit=cfg.store.passages_limit)
    cache = EmbeddingCache.open(corpus_path(cfg.data), retriever)
    return build_shard(
        passages,
        retriever,
        cache=cache,
        batch_size=cfg.store.index_batch_size,
        progress=progress,
        replace=replace,
        **store_location(cfg),
    )


def _stale(folder: Path, retriever: DualEncoder) -> bool:
    """A complete shard whose recorded context-encoder fingerprint is not this retriever's."""
    try:
        built = json.loads((folder / MANIFEST).read_text()).get("context_fingerprint")
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return built is not None and built != retriever.context_fingerprint()


def open_store(cfg: AppConfig, retriever: DualEncoder, *, progress: bool = False) -> KnowledgeStore:
    """Open the configured shard, checked against the retriever that will query it. The default shard in the cache
    (no store.path / store.url) is built from the embedding cache when missing; a configured one must exist. With
    store.mcp-url, retrieval goes through that MCP server's search tool instead (rag/mcp_source.py)."""
    if cfg.store.mcp_url:
        from fedrag_app.rag.mcp_source import McpKnowledgeSource

        return McpKnowledgeSource(cfg.store.mcp_url, cfg.store.mcp_tool)
    where = store_location(cfg)
    if is_default_location(cfg) and _stale(Path(where["path"]), retriever):
        # the default shard is only a cache of (corpus, retriever): rebuilt from the cached vectors, never refused
        log.warning("rebuilding the knowledge store %s: built by other context-encoder weights", where["path"])
        build_store(cfg, retriever, progress=progress, replace=True)
    if is_default_location(cfg) and not (Path(where["path"]) / MANIFEST).exists():
        log.warning(
            "building the knowledge store %s from the embedding cache (encoding only passages not cached yet)",
            where["path"],
        )
        try:
            build_store(cfg, retriever, progress=progress)
        except DataError as e:  # no corpus here: callers that can go on without a store catch StoreError
            raise StoreError(f"cannot build the knowledge store {where['path']}: {e}") from e
        except StoreError:
            if not (Path(where["path"]) / MANIFEST).exists():  # not just another process finishing first
                raise
    return KnowledgeStore.open(
        **where, embedding_model=retriever.name, dim=retriever.dim, context_fingerprint=retriever.context_fingerprint()
    )


class RagPipeline:
    """Retrieval + generation with the one prompt template that training also uses."""

    def __init__(self, generator: Generator, retriever: DualEncoder, store: KnowledgeStore | None, top_k: int):
        self.generator, self.retriever, self.store, self.top_k = generator, retriever, store, top_k

    def retrieve(
        self, questions: list[str], top_k: int | None = None, *, with_vectors: bool = False
    ) -> list[list[Hit]]:
        """Top-k hits per question; an empty list each when there is no store or k = 0 (closed book)."""
        k = self.top_k if top_k is None else top_k
        if self.store is None or k == 0:
            return [[] for _ in questions]
        return retrieve(self.retriever, self.store, questions, k, with_vectors=with_vectors)

    def prompts(self, questions: list[str], hits: list[list[Hit]]) -> list[str]:
        tok = self.generator.tokenizer
        return [build_prompt(tok, q, [format_passage(h.title, h.text) for h in hs]) for q, hs in zip(questions, hits)]

    def answer(
        self, questions: list[str], *, max_new_tokens: int = 32, batch_size: int = 8, top_k: int | None = None
    ) -> list[RagAnswer]:
        hits = self.retrieve(questions, top_k)
        answers = generate(
            self.generator, self.prompts(questions, hits), max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        return [RagAnswer(q, a, h) for q, a, h in zip(questions, answers, hits)]
