"""The run-config section of a question-time run (``fed.task = "query"``): which questions, how the nodes' replies
are merged, which models answer. A section of AppConfig (app_config.SECTIONS); kept here so app_config.py stays
small."""

from __future__ import annotations

from dataclasses import dataclass

from fedrag_app.config.values import _help, _one_of, _positive
from fedrag_app.core.errors import ConfigError

MAX_TOP_K_PER_NODE = 100  # a node never sends more passages than this per question, whatever it is asked


@dataclass(frozen=True)
class QueryConfig:
    """Federated RAG at question time: the server asks every opted-in node for its top passages and answers."""

    question: str = _help(
        "one question to ask (what `fedrag-app ask --federation` sends); overrides questions-path", ""
    )
    questions_path: str = _help(
        "absolute JSONL of questions ({question, answers?}) on the server; '' = Web Questions test split", ""
    )
    questions_limit: int = _help("first N questions of the source; 0 = all", 30)
    merge: str = _help(
        "score (sort every reply's passages by cosine score: one encoder makes them comparable, so this equals one "
        "index over the union) | rrf (reciprocal-rank fusion, for nodes whose scores are not comparable)",
        "score",
    )
    rrf_k: int = _help("k of RRF: a passage at rank r in a node's list adds 1 / (k + r)", 60)
    top_k_per_node: int = _help("passages each node returns per question (at most 100)", 10)
    batch_size: int = _help("questions per query.retrieve message (one message per node per batch)", 16)
    timeout_s: int = _help(
        "seconds to wait for the nodes' replies to one batch; late nodes are counted, not fatal", 120
    )
    checkpoint: str = _help(
        "checkpoint folder (round-NNNN) whose global adapter and retriever answer; 'latest' = "
        "the last in fed.output-dir; '' = base models (and generator.adapter-path)",
        "",
    )
    opted_in_partitions: str = _help(
        "simulation only: comma-separated partition ids that answer query.retrieve (a "
        "node with its own node-config decides by its federated-retrieval key)",
        "",
    )

    def __post_init__(self) -> None:
        _one_of("query", "merge", self.merge, ("rrf", "score"))
        _positive("query", "questions_limit", self.questions_limit, zero_ok=True)
        _positive("query", "rrf_k", self.rrf_k, zero_ok=True)
        _positive("query", "top_k_per_node", self.top_k_per_node)
        _positive("query", "batch_size", self.batch_size)
        _positive("query", "timeout_s", self.timeout_s)
        if self.top_k_per_node > MAX_TOP_K_PER_NODE:
            raise ConfigError(
                f"run-config key 'query.top-k-per-node' = {self.top_k_per_node}: at most "
                f"{MAX_TOP_K_PER_NODE} passages leave a node per question"
            )
        _ = self.opted_in

    @property
    def opted_in(self) -> frozenset[int]:
        """query.opted-in-partitions as partition ids."""
        try:
            return frozenset(int(p) for p in self.opted_in_partitions.split(",") if p.strip())
        except ValueError as e:
            raise ConfigError(
                f"run-config key 'query.opted-in-partitions' = {self.opted_in_partitions!r}: expected "
                "comma-separated partition ids, e.g. '0,1'"
            ) from e
