"""What a query run leaves behind: answers.jsonl and query-metrics.json in the output folder, and one log line per
answer plus one for the metrics (the lines `fedrag-app ask --federation` reads back with `flwr log`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedrag_app.core.atomic import write_json, write_text
from fedrag_app.data.loaders import QAExample
from fedrag_app.federation.query.merge import MergedHit

ANSWERS_FILE, METRICS_FILE = "answers.jsonl", "query-metrics.json"
ANSWER_LOG, METRICS_LOG = "fedrag-answer", "fedrag-query-metrics"  # ServerApp log prefixes `ask --federation` reads


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


def write_outputs(out_dir, rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> None:
    """answers.jsonl and query-metrics.json, each written atomically."""
    write_text(Path(out_dir) / ANSWERS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json(Path(out_dir) / METRICS_FILE, dict(metrics))
