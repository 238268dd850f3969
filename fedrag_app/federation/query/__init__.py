"""Federated RAG at question time (fed.task = "query"), without Flower: one module per job.

merge (the nodes' passage lists into one ranked list per question: score sort or RRF) · replies (the opt-in rule,
a node's limits, a reply packed and checked) · questions (what a run asks) · answering (prompts from the merged
passages, generation, scores via evaluation/metrics.py) · outputs (answers.jsonl, query-metrics.json, log lines).
The Flower side is flower/server_query.py (the server's loop) and flower/client_app.py (a node's search).

The names below are the package's API, importable from here as before the split."""

from fedrag_app.federation.query.answering import answer_and_score, answer_prompts, score_answers
from fedrag_app.federation.query.merge import MergedHit, NodeHit, merge, merge_by_score, merge_rrf
from fedrag_app.federation.query.outputs import (
    ANSWER_LOG,
    ANSWERS_FILE,
    METRICS_FILE,
    METRICS_LOG,
    answer_rows,
    log_row,
    write_outputs,
)
from fedrag_app.federation.query.questions import load_questions
from fedrag_app.federation.query.replies import (
    LIMITED,
    MAX_PASSAGE_CHARS,
    REFUSAL,
    REPLY_KINDS,
    SIMULATION_KEYS,
    opted_in,
    over_limits,
    pack_hits,
    read_reply,
    unpack_hits,
)

__all__ = [
    "ANSWERS_FILE",
    "ANSWER_LOG",
    "LIMITED",
    "MAX_PASSAGE_CHARS",
    "METRICS_FILE",
    "METRICS_LOG",
    "REFUSAL",
    "REPLY_KINDS",
    "SIMULATION_KEYS",
    "MergedHit",
    "NodeHit",
    "answer_and_score",
    "answer_prompts",
    "answer_rows",
    "load_questions",
    "log_row",
    "merge",
    "merge_by_score",
    "merge_rrf",
    "opted_in",
    "over_limits",
    "pack_hits",
    "read_reply",
    "score_answers",
    "unpack_hits",
    "write_outputs",
]
