"""One loaded RAG system that every bridge (LlamaIndex, LangChain, MCP, HTTP) is a thin view of.

It holds the product's own pipeline (retriever + optional fine-tuned query encoder, store, generator + adapter, the one
prompt template), so a bridge retrieves and answers exactly as `fedrag-app ask` does. Requests are checked here once
for every bridge (a bad one is a `BadRequest` that names the field and its limits), and calls are serialised by a
lock: the generator and an embedded shard are one model and one open file shared by a server's threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.errors import FedRagAppError
from fedrag_app.rag.generator import generate
from fedrag_app.rag.knowledge_store import Hit
from fedrag_app.rag.pipeline import RagAnswer, RagPipeline

MAX_TOP_K = 50  # passages one request may ask for: a prompt of more would not fit the generator's context anyway
MAX_NEW_TOKENS = 512
MAX_QUESTION_CHARS = 4000


class BadRequest(FedRagAppError, ValueError):
    """A request a bridge refuses: empty question, k out of range, too many tokens asked for."""


def passage_dict(hit: Hit, rank: int) -> dict:
    """A retrieved passage as every bridge shows it: the keys of `fedrag-app ask --json`."""
    return {"rank": rank, "id": hit.id, "score": hit.score, "title": hit.title, "text": hit.text}


def checked_k(k: object, field: str = "k", zero_ok: bool = False) -> int:
    """A request's passage count, 1 (0 with ``zero_ok``: closed book) to MAX_TOP_K, else a BadRequest naming it."""
    if isinstance(k, bool) or not isinstance(k, int) or not (0 if zero_ok else 1) <= k <= MAX_TOP_K:
        raise BadRequest(f"'{field}' must be an integer from {0 if zero_ok else 1} to {MAX_TOP_K}, got {k!r}")
    return k


def checked_max_new_tokens(n: object, field: str = "max_tokens") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
        raise BadRequest(f"'{field}' must be an integer from 1 to {MAX_NEW_TOKENS}, got {n!r}")
    return n


@dataclass
class RagService:
    """The pipeline behind a lock, with `ask`'s defaults (eval.top-k, generator.max-new-tokens)."""

    pipeline: RagPipeline
    max_new_tokens: int = 32
    name: str = "fedrag"

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    @classmethod
    def load(cls, cfg: AppConfig, *, retriever_path: str | None = None, name: str = "fedrag") -> RagService:
        """The models and store `ask` loads for the same config (generator.adapter-path, store.*, eval.top-k)."""
        from fedrag_app.config.runtime import apply_runtime
        from fedrag_app.rag.generator import load_generator
        from fedrag_app.rag.pipeline import open_store
        from fedrag_app.rag.retriever import load_retriever

        device = apply_runtime(cfg.runtime)
        retriever = load_retriever(cfg.retriever, device=device, path=retriever_path)
        gen = load_generator(cfg.generator, device=device)
        store = open_store(cfg, retriever) if cfg.eval.top_k else None
        return cls(RagPipeline(gen, retriever, store, cfg.eval.top_k), cfg.generator.max_new_tokens, name)

    @property
    def tokenizer(self):
        return self.pipeline.generator.tokenizer

    @property
    def top_k(self) -> int:
        return self.pipeline.top_k

    def close(self) -> None:
        if self.pipeline.store is not None:
            self.pipeline.store.close()

    # --- checks shared by every bridge ---

    @staticmethod
    def check_question(question: object, field: str = "question") -> str:
        if not isinstance(question, str) or not question.strip():
            raise BadRequest(f"'{field}' must be a non-empty string")
        if len(question) > MAX_QUESTION_CHARS:
            raise BadRequest(f"'{field}' has {len(question)} characters; at most {MAX_QUESTION_CHARS}")
        return question.strip()

    def check_k(self, k: object, *, field: str = "k", zero_ok: bool = False) -> int:
        k = checked_k(self.top_k if k is None else k, field, zero_ok)
        if k and self.pipeline.store is None:
            raise BadRequest("this server has no knowledge store (started with eval.top-k = 0): closed book only")
        return k

    def check_max_new_tokens(self, n: object, field: str = "max_tokens") -> int:
        return checked_max_new_tokens(self.max_new_tokens if n is None else n, field)

    # --- what the bridges call ---

    def search(self, query: str, k: int | None = None) -> list[Hit]:
        """The top-k passages for one query, as `ask` retrieves them."""
        query, k = self.check_question(query, "query"), self.check_k(k)
        with self._lock:
            return self.pipeline.retrieve([query], k)[0]

    def answer(self, question: str, *, top_k: int | None = None, max_new_tokens: int | None = None) -> RagAnswer:
        """Retrieve, prompt with the one template, greedy answer: `ask` for one question (top_k 0: closed book)."""
        question = self.check_question(question)
        top_k = self.check_k(top_k, field="top_k", zero_ok=True)
        max_new_tokens = self.check_max_new_tokens(max_new_tokens)
        with self._lock:
            return self.pipeline.answer([question], max_new_tokens=max_new_tokens, top_k=top_k)[0]

    def prompt(self, question: str, hits: list[Hit]) -> str:
        """The product's prompt for a question and its passages (what training saw)."""
        return self.pipeline.prompts([question], [hits])[0]

    def chat_prompt(self, messages: list[dict]) -> str:
        """A conversation (role/content dicts) in the generator's own chat format, ready for its answer."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def complete(self, prompt: str, *, max_new_tokens: int | None = None) -> str:
        """Greedy continuation of a prompt used exactly as given (LLM wrappers; chat formatting is the caller's)."""
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string")
        max_new_tokens = self.check_max_new_tokens(max_new_tokens, "max_new_tokens")
        with self._lock:
            return generate(self.pipeline.generator, [prompt], max_new_tokens=max_new_tokens)[0]
