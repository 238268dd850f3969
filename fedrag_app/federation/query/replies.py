"""What a node sends for a query.retrieve message and what the server accepts of it: the opt-in rule, a node's
limits, the reply packed into flat lists and read back with every field checked (a bad reply is dropped and
counted, like a bad training update)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedrag_app.federation.query.merge import NodeHit

SIMULATION_KEYS = frozenset({"partition-id", "num-partitions"})  # all a simulated node's node-config holds
MAX_PASSAGE_CHARS = 20_000  # a reply passage longer than this is refused (the corpus's are ~100 words)
REFUSAL = "federated retrieval is off on this node"  # in a refusing node's error reply: counted as refused
LIMITED = "over this node's query limits"  # in the error reply to a message asking more than the node allows
REPLY_KINDS = ("ok", "refused", "limited", "error", "invalid", "timeout")  # how each node's reply to a batch counts


def opted_in(
    node_config: Mapping[str, Any], federated_retrieval: bool, partition_id: int, opted_in_partitions: frozenset[int]
) -> bool:
    """A node answers if its node-config says federated-retrieval=true. Only a simulated node (node-config of just
    partition-id/num-partitions, which cannot carry more) may be opted in by the run-config's partition list: a
    SuperNode with its own node-config decides for itself, whatever the run's submitter asks."""
    if "federated-retrieval" in node_config or not set(node_config) <= SIMULATION_KEYS:
        return federated_retrieval
    return partition_id in opted_in_partitions


def over_limits(questions: int, top_k: int, answered: int, max_questions: int, max_k: int) -> str | None:
    """Why a query.retrieve message asks more than the node allows, or None: top_k passages per question against its
    node-config query-max-k, and ``questions`` more after the ``answered`` ones of this run against
    query-max-questions. The node refuses the whole message (an error reply the server counts as limited)."""
    if not 0 < top_k <= max_k:
        return f"{LIMITED}: top-k = {top_k} passages per question, node-config query-max-k = {max_k}"
    if answered + questions > max_questions:
        return (
            f"{LIMITED}: {questions} more questions after {answered} in this run, node-config "
            f"query-max-questions = {max_questions}"
        )
    return None


def pack_hits(per_question: Sequence[Sequence[Any]]) -> dict[str, list]:
    """A node's reply as flat lists (ConfigRecord values cannot nest): ``counts[i]`` passages for question i."""
    flat = [h for hits in per_question for h in hits]
    return {
        "ids": [h.id for h in flat],
        "titles": [h.title for h in flat],
        "texts": [h.text for h in flat],
        "scores": [float(h.score) for h in flat],
        "counts": [len(hits) for hits in per_question],
    }


def unpack_hits(
    docs: Mapping[str, Any], n_questions: int, top_k: int, *, node: int, partition: int | None = None
) -> list[list[NodeHit]]:
    """A node's reply back into one ranked list per question, checked like a training reply: the fields, their
    types and sizes (no more than top_k passages per question asked, one count per question, finite scores).
    Raises ValueError naming what is wrong; the caller drops that node's reply and counts it."""
    need = ("ids", "titles", "texts", "scores", "counts")
    missing = [k for k in need if k not in docs]
    if missing:
        raise ValueError(f"reply lacks {missing}")
    ids, titles, texts, scores, counts = (list(docs[k]) for k in need)
    if len(counts) != n_questions or not all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= top_k for c in counts
    ):
        raise ValueError(f"counts {counts[:8]} do not give 0..{top_k} passages for each of {n_questions} questions")
    if not len(ids) == len(titles) == len(texts) == len(scores) == sum(counts):
        raise ValueError(
            f"{len(ids)} ids, {len(titles)} titles, {len(texts)} texts, {len(scores)} scores for {sum(counts)} passages"
        )
    if not all(isinstance(v, str) and v for v in ids) or not all(isinstance(v, str) for v in titles + texts):
        raise ValueError("ids, titles and texts must be strings (ids non-empty)")
    if any(len(t) > MAX_PASSAGE_CHARS for t in texts):
        raise ValueError(f"a passage is longer than {MAX_PASSAGE_CHARS} characters")
    if not all(isinstance(s, float) and math.isfinite(s) for s in scores):
        raise ValueError("scores must be finite floats")
    out, start = [], 0
    for count in counts:
        rows = range(start, start + count)
        out.append([NodeHit(ids[i], titles[i], texts[i], scores[i], i - start + 1, node, partition) for i in rows])
        start += count
    return out


def read_reply(message, n_questions: int, top_k: int) -> tuple[str, list[list[NodeHit]], float, str | None]:
    """(ok | refused | limited | error | invalid, one passage list per question, the node's seconds, why not ok) of
    one Flower reply to query.retrieve; a reply that is not ok contributes empty lists. Only the reply's records are
    read."""
    empty, node = [[] for _ in range(n_questions)], message.metadata.src_node_id
    if message.has_error():
        reason = str(message.error.reason)
        kind = "refused" if REFUSAL in reason else "limited" if LIMITED in reason else "error"
        return kind, empty, 0.0, reason[-300:]
    content = message.content
    try:
        if set(content.keys()) != {"docs", "metrics"} or "docs" not in content.config_records:
            raise ValueError(
                f"expected a ConfigRecord 'docs' and a MetricRecord 'metrics', got {sorted(content.keys())}"
            )
        seconds, partition = content["metrics"].get("node-seconds"), content["docs"].get("partition-id")
        if not isinstance(seconds, (int, float)) or (partition is not None and not isinstance(partition, int)):
            raise ValueError(f"metrics node-seconds = {seconds!r}, docs partition-id = {partition!r}")
        return (
            "ok",
            unpack_hits(content["docs"], n_questions, top_k, node=node, partition=partition),
            float(seconds),
            None,
        )
    except ValueError as e:
        return "invalid", empty, 0.0, f"reply dropped: {e}"
