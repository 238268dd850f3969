"""The federation behind a bridge, on the operator's side: `fedrag-app mcp --federation <connection>` answers
`search` and `ask` with a query run across the opted-in institutions' shards (federation/ask.py: one `flwr run` with
fed.task = "query" per call, so tens of seconds each), and no shard leaves its node. The same checks as RagService;
passage texts come back as the ServerApp logs them: their first 300 characters (federation/query/outputs.log_row)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedrag_app.bridges.service import RagService, checked_k, checked_max_new_tokens
from fedrag_app.rag.knowledge_store import Hit
from fedrag_app.rag.pipeline import RagAnswer


@dataclass
class FederatedService:
    """`search` / `ask` through a running federation (a flwr connection: a SuperLink, or `local` simulation)."""

    connection: str
    federation_config: str = ""
    overrides: Mapping[str, Any] = field(default_factory=dict)  # run-config keys that differ from the defaults
    top_k: int = 5
    max_new_tokens: int = 32
    top_k_per_node: int = 10
    name: str = "fedrag"

    def search(self, query: str, k: int | None = None) -> list[Hit]:
        """The federation's top-k passages for one query, merged from every opted-in institution's."""
        return self.answer(RagService.check_question(query, "query"), top_k=k, field="k").hits

    def answer(
        self, question: str, *, top_k: int | None = None, max_new_tokens: int | None = None, field: str = "top_k"
    ) -> RagAnswer:
        from fedrag_app.federation.ask import ask_federation

        question = RagService.check_question(question)
        k = checked_k(self.top_k if top_k is None else top_k, field)
        tokens = checked_max_new_tokens(self.max_new_tokens if max_new_tokens is None else max_new_tokens)
        overrides = {
            **self.overrides,
            "eval.top-k": k,
            "query.top-k-per-node": max(k, self.top_k_per_node),  # every node may hold all k of the best
            "generator.max-new-tokens": tokens,
        }
        result = ask_federation(question, self.connection, overrides, federation_config=self.federation_config)
        hits = [Hit(p["id"], float(p["score"]), p["title"], p["text"]) for p in result["passages"][:k]]
        return RagAnswer(question, result["answer"], hits)

    def close(self) -> None:
        """Nothing held: each call is its own run."""
