"""Answering from the merged passages: the prompt (the one template training uses, rag/prompts.py), greedy
generation, and the run's metrics. Answers and passages are scored by evaluation/metrics.py, as the evaluation
suite scores them; here only the questions that have gold answers count."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fedrag_app.config.app_config import AppConfig
from fedrag_app.data.loaders import QAExample
from fedrag_app.evaluation.metrics import answer_ranks, qa_means, qa_scores, retrieval_means
from fedrag_app.federation.query.merge import MergedHit
from fedrag_app.federation.query.outputs import answer_rows
from fedrag_app.rag.prompts import build_prompt, format_passage


def answer_prompts(tokenizer, questions: Sequence[str], merged: Sequence[Sequence[MergedHit]], top_k: int) -> list[str]:
    """The RAG prompt of each question with its merged top_k passages (the template training uses)."""
    return [
        build_prompt(tokenizer, q, [format_passage(h.title, h.text) for h in hs[:top_k]])
        for q, hs in zip(questions, merged)
    ]


def score_answers(
    examples: Sequence[QAExample], answers: Sequence[str], merged: Sequence[Sequence[MergedHit]], recall_k: int
) -> dict[str, float]:
    """EM/F1 of the answers and answer recall@k / MRR@k of the merged lists, over the questions with gold answers."""
    scored = [(e, a, hs) for e, a, hs in zip(examples, answers, merged) if e.answers]
    if not scored:
        return {"scored-n": 0.0}
    qa = qa_means(qa_scores(a, e.answers) for e, a, _ in scored)
    retrieval = retrieval_means(answer_ranks([hs for *_, hs in scored], [e for e, *_ in scored], recall_k), recall_k)
    return {
        "wq-em": qa["wq-em"],
        "wq-f1": qa["wq-f1"],
        f"retrieval-recall@{recall_k}": retrieval[f"retrieval-recall@{recall_k}"],
        f"retrieval-mrr@{recall_k}": retrieval[f"retrieval-mrr@{recall_k}"],
        "scored-n": qa["wq-n"],
    }


def answer_and_score(
    cfg: AppConfig, gen, examples: Sequence[QAExample], merged: Sequence[Sequence[MergedHit]], clock: dict[str, float]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate every answer from its merged top eval.top-k passages; the answer rows and the run's metrics:
    EM/F1 and recall@k where gold answers exist, and seconds per question from ``clock`` (encode, round-trip,
    node: the slowest node's own seconds per batch) plus generation and Flower's share (round trip - node)."""
    from fedrag_app.rag.generator import generate  # torch: only the ServerApp that answers needs it

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
