"""Federated RAG at question time, without Flower: read the nodes' passage lists, merge them, answer, score, write.

Each opted-in node returns its own top-k passages for a question (ranked by cosine score against its own shard).
The server merges the lists that arrived: reciprocal-rank fusion (a passage at 1-based rank r of a node's list
adds 1 / (k + r), summed over the lists that hold it, k = query.rrf-k; Cormack et al. 2009) or
plain score sorting (cosine scores from one encoder are comparable across shards: the score-sorted merge of every
node's exact top-k is the top-k of one index over the union). Either way a passage id appears once. Then the
generator answers from the merged top passages with the one prompt template (prompts.py) training also uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.atomic import write_json, write_text
from fedrag_app.core.errors import DataError
from fedrag_app.data.loaders import QAExample, load_web_questions, read_jsonl
from fedrag_app.evaluation.metrics import RunningMean, answer_rank, exact_match, recall_at_k, reciprocal_rank, token_f1
from fedrag_app.rag.prompts import build_prompt, format_passage

SIMULATION_KEYS = frozenset({"partition-id", "num-partitions"})  # all a simulated node's node-config holds
MAX_PASSAGE_CHARS = 20_000  # a reply passage longer than this is refused (the corpus's are ~100 words)
REFUSAL = "federated retrieval is off on this node"  # in a refusing node's error reply: counted as refused
LIMITED = "over this node's query limits"  # in the error reply to a message asking more than the node allows
ANSWERS_FILE, METRICS_FILE = "answers.jsonl", "query-metrics.json"
REPLY_KINDS = ("ok", "refused", "limited", "error", "invalid", "timeout")  # how each node's reply to a batch counts
ANSWER_LOG, METRICS_LOG = "fedrag-answer", "fedrag-query-metrics"  # ServerApp log prefixes `ask --federation` reads


@dataclass(frozen=True)
class NodeHit:
    """A passage as one node returned it: its cosine score and 1-based rank in that node's list."""

    id: str
    title: str
    text: str
    score: float
    rank: int
    node: int  # Flower node id of the sender
    partition: int | None = None  # the partition id the node reported, if any


@dataclass(frozen=True)
class MergedHit:
    """A merged passage: ``score`` is what it was ranked by (RRF sum or cosine); ``sources`` every list holding it."""

    id: str
    title: str
    text: str
    score: float
    sources: tuple[NodeHit, ...] = field(default=())

    def as_row(self) -> dict[str, Any]:
        best = self.sources[0]
        return {
            "id": self.id,
            "title": self.title,
            "text": self.text,
            "score": self.score,
            "node": best.node,
            "partition": best.partition,
            "node-score": best.score,
            "node-rank": best.rank,
            "nodes": [s.node for s in self.sources],
        }


def merge_rrf(lists: Sequence[Sequence[NodeHit]], k: int = 60, top: int | None = None) -> list[MergedHit]:
    """Reciprocal-rank fusion over the nodes' lists; ties broken by best cosine score, then id (deterministic)."""
    fused: dict[str, float] = {}
    sources: dict[str, list[NodeHit]] = {}
    for hits in lists:
        for hit in hits:
            fused[hit.id] = fused.get(hit.id, 0.0) + 1.0 / (k + hit.rank)
            sources.setdefault(hit.id, []).append(hit)
    return _ranked(fused, sources, top)


def merge_by_score(lists: Sequence[Sequence[NodeHit]], top: int | None = None) -> list[MergedHit]:
    """Every list's passages sorted by cosine score; a passage several nodes hold keeps its best score."""
    best: dict[str, float] = {}
    sources: dict[str, list[NodeHit]] = {}
    for hits in lists:
        for hit in hits:
            best[hit.id] = max(best.get(hit.id, -math.inf), hit.score)
            sources.setdefault(hit.id, []).append(hit)
    return _ranked(best, sources, top)


def merge(
    lists: Sequence[Sequence[NodeHit]], method: str, *, rrf_k: int = 60, top: int | None = None
) -> list[MergedHit]:
    if method == "rrf":
        return merge_rrf(lists, rrf_k, top)
    if method == "score":
        return merge_by_score(lists, top)
    raise ValueError(f"merge method must be 'rrf' or 'score', got {method!r}")


def _ranked(scores: dict[str, float], sources: dict[str, list[NodeHit]], top: int | None) -> list[MergedHit]:
    def best_first(h: NodeHit) -> tuple:
        return (-h.score, h.rank, h.node)

    order = sorted(scores, key=lambda pid: (-scores[pid], -max(s.score for s in sources[pid]), pid))
    out = []
    for pid in order[:top]:
        held = tuple(sorted(sources[pid], key=best_first))
        out.append(MergedHit(pid, held[0].title, held[0].text, scores[pid], held))
    return out


# --- what a node sends and what the server accepts ---------------------------------------------------------------
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


# --- questions, answers, scores, files ---------------------------------------------------------------------------
def load_questions(cfg: AppConfig) -> list[QAExample]:
    """query.question, else query.questions-path (answers optional), else the Web Questions test split."""
    q = cfg.query
    if q.question.strip():
        return [QAExample("q-1", q.question.strip(), (), "")]
    if not q.questions_path:
        return load_web_questions("test", cfg.data, q.questions_limit)
    out = []
    for lineno, obj in read_jsonl(q.questions_path, ("question",)):
        answers = obj.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{q.questions_path}:{lineno}: field 'answers' must be a list of strings")
        out.append(QAExample(str(obj.get("id") or f"q-{lineno}"), str(obj["question"]), tuple(answers), ""))
        if q.questions_limit and len(out) >= q.questions_limit:
            break
    return out


def answer_prompts(tokenizer, questions: Sequence[str], merged: Sequence[Sequence[MergedHit]], top_k: int) -> list[str]:
    """The RAG prompt of each question with its merged top_k passages (the template training uses)."""
    return [
        build_prompt(tokenizer, q, [format_passage(h.title, h.text) for h in hs[:top_k]])
        for q, hs in zip(questions, merged)
    ]


def answer_rows(
    examples: Sequence[QAExample], answers: Sequence[str], merged: Sequence[Sequence[MergedHit]]
) -> list[dict[str, Any]]:
    return [
        {"id": e.id, "question": e.question, "answer": a, "gold": list(e.answers), "passages": [h.as_row() for h in hs]}
        for e, a, hs in zip(examples, answers, merged)
    ]


def log_row(row: Mapping[str, Any], top_k: int, chars: int = 300) -> dict[str, Any]:
    """What the ServerApp logs of an answer: the question, the answer and the passages in its prompt (text cut)."""
    passages = [{**p, "text": p["text"][:chars]} for p in row["passages"][:top_k]]
    return {"question": row["question"], "answer": row["answer"], "passages": passages}


def score_answers(
    examples: Sequence[QAExample], answers: Sequence[str], merged: Sequence[Sequence[MergedHit]], recall_k: int
) -> dict[str, float]:
    """EM/F1 of the answers and answer recall@k / MRR@k of the merged lists, over the questions with gold answers."""
    em, f1, recall, mrr = RunningMean(), RunningMean(), RunningMean(), RunningMean()
    for e, a, hs in zip(examples, answers, merged):
        if not e.answers:
            continue
        em.add(exact_match(a, e.answers))
        f1.add(token_f1(a, e.answers))
        rank = answer_rank([f"{h.title} {h.text}" for h in hs[:recall_k]], e.answers)
        recall.add(recall_at_k(rank, recall_k))
        mrr.add(reciprocal_rank(rank, recall_k))
    if not em.count:
        return {"scored-n": 0.0}
    return {
        "wq-em": em.value,
        "wq-f1": f1.value,
        f"retrieval-recall@{recall_k}": recall.value,
        f"retrieval-mrr@{recall_k}": mrr.value,
        "scored-n": float(em.count),
    }


def answer_and_score(
    cfg: AppConfig, gen, examples: Sequence[QAExample], merged: Sequence[Sequence[MergedHit]], clock: dict[str, float]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate every answer from its merged top eval.top-k passages; the answer rows and the run's metrics:
    EM/F1 and recall@k where gold answers exist, and seconds per question from ``clock`` (encode, round-trip,
    node: the slowest node's own seconds per batch) plus generation and Flower's share (round trip - node)."""
    import time

    from fedrag_app.rag.generator import generate

    started = time.perf_counter()
    prompts = answer_prompts(gen.tokenizer, [e.question for e in examples], merged, cfg.eval.top_k)
    answers = generate(gen, prompts, max_new_tokens=cfg.generator.max_new_tokens, batch_size=cfg.eval.batch_size)
    clock = {**clock, "generation": time.perf_counter() - started}
    n, q = max(1, len(examples)), cfg.query
    metrics = {
        "questions": len(examples),
        "merge": q.merge,
        "rrf-k": q.rrf_k,
        "top-k-per-node": q.top_k_per_node,
        "batch-size": q.batch_size,
        "prompt-top-k": cfg.eval.top_k,
        **score_answers(examples, answers, merged, cfg.eval.recall_k),
        **{f"s-per-question-{k}": v / n for k, v in clock.items()},
        "s-per-question-flower": max(0.0, clock.get("round-trip", 0.0) - clock.get("node", 0.0)) / n,
    }
    return answer_rows(examples, answers, merged), metrics


def write_outputs(out_dir, rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> None:
    """answers.jsonl and query-metrics.json, each written atomically."""
    import json
    from pathlib import Path

    write_text(Path(out_dir) / ANSWERS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json(Path(out_dir) / METRICS_FILE, dict(metrics))
