"""Is a tuned retriever's recall@10 gain real, or a few questions of 500? A paired comparison on the same questions.

    PYTHONPATH=. python benchmarks/retrieval_paired.py results/quality_full/runs/*/lsr/*/round-0004/retriever

The quality table compares each cell's recall@10 with the untuned retriever's and spreads it over seeds; that spread
says how much training noise moves the figure, not whether 500 test questions can tell the two retrievers apart.
Here every retriever (a folder written by `DualEncoder.save`: a checkpoint's `retriever/`) and the untuned one query
the same full-corpus store for the same first --questions Web Questions test questions; per question: did a gold
answer reach the top k, and at which rank. Printed per retriever: recall@k and MRR@k, the questions it gains and
loses against the untuned retriever, the exact two-sided sign test (McNemar) on those, and a 95% paired bootstrap
interval of the recall@k and MRR@k differences. Retrieval only (no generation): about a minute per retriever on
2 cores once the store exists (`fedrag-app index --set store.passages-limit=0` builds it from the embedding cache).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrag_app.cli import load_config  # noqa: E402
from fedrag_app.config.runtime import apply_runtime  # noqa: E402
from fedrag_app.core.atomic import write_json  # noqa: E402
from fedrag_app.data.loaders import load_web_questions  # noqa: E402
from fedrag_app.evaluation.evaluate import answer_ranks  # noqa: E402
from fedrag_app.evaluation.metrics import recall_at_k, reciprocal_rank  # noqa: E402
from fedrag_app.evaluation.paired import bootstrap_interval, sign_test_p  # noqa: E402
from fedrag_app.rag.pipeline import open_store  # noqa: E402
from fedrag_app.rag.retrieval import retrieve  # noqa: E402
from fedrag_app.rag.retriever import load_retriever  # noqa: E402

FULL_CORPUS = ["store.passages-limit=0"]  # the quality table's evaluation store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("retrievers", nargs="+", type=Path, help="saved retriever folders (dual_encoder.json inside)")
    parser.add_argument("--questions", type=int, default=500, help="the first N Web Questions test questions")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="run-config override (repeatable)")
    args = parser.parse_args()
    for folder in args.retrievers:
        if not (folder / "dual_encoder.json").exists():
            parser.error(f"{folder} is not a saved retriever (no dual_encoder.json)")
    cfg = load_config(None, FULL_CORPUS + args.sets)
    device = apply_runtime(cfg.runtime)
    untuned = load_retriever(cfg.retriever, device=device)
    test = load_web_questions("test", cfg.data, args.questions)
    questions = [e.question for e in test]

    def per_question(retriever, store) -> tuple[np.ndarray, np.ndarray]:
        """Answer recall@k and reciprocal rank@k of each question, as evaluate_retrieval counts them."""
        found = answer_ranks(retrieve(retriever, store, questions, args.k), test, args.k)
        return np.array([recall_at_k(r, args.k) for r in found]), np.array([reciprocal_rank(r, args.k) for r in found])

    with open_store(cfg, untuned) as store:
        base = per_question(untuned, store)
        rows = []
        for folder in args.retrievers:
            tuned = per_question(load_retriever(cfg.retriever, device=device, path=str(folder)), store)
            rows.append(compare(str(folder), base, tuned, args))
    untuned_row = {"recall": float(base[0].mean()), "mrr": float(base[1].mean()), "n": len(base[0])}
    print(f"untuned: recall@{args.k} {untuned_row['recall']:.3f}, MRR@{args.k} {untuned_row['mrr']:.3f}, n {len(test)}")
    print(
        f"| retriever | recall@{args.k} | MRR@{args.k} | gained | lost | sign-test p "
        "| recall diff 95% | MRR diff 95% |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['retriever']} | {r['recall']:.3f} | {r['mrr']:.3f} | {r['gained']} | {r['lost']} | {r['p']:.3f} "
            f"| {r['recall-diff-low']:+.3f} … {r['recall-diff-high']:+.3f} | {r['mrr-diff-low']:+.3f} … "
            f"{r['mrr-diff-high']:+.3f} |"
        )
    if args.json:
        write_json(args.json, {"untuned": untuned_row, "tuned": rows}, indent=1, sort_keys=False)


def compare(name: str, base: tuple[np.ndarray, np.ndarray], tuned: tuple[np.ndarray, np.ndarray], args) -> dict:
    """One tuned retriever against the untuned one on the same questions: (recall, reciprocal rank) arrays each."""
    (base_hit, base_rr), (hit, rr) = base, tuned
    gained, lost = int(np.sum((hit > 0) & (base_hit == 0))), int(np.sum((hit == 0) & (base_hit > 0)))
    recall_low, recall_high = bootstrap_interval(hit - base_hit, args.resamples, args.seed)
    mrr_low, mrr_high = bootstrap_interval(rr - base_rr, args.resamples, args.seed)
    return {
        "retriever": name,
        "recall": float(hit.mean()),
        "mrr": float(rr.mean()),
        "gained": gained,
        "lost": lost,
        "p": sign_test_p(gained, lost),
        "recall-diff-low": recall_low,
        "recall-diff-high": recall_high,
        "mrr-diff-low": mrr_low,
        "mrr-diff-high": mrr_high,
    }


if __name__ == "__main__":
    main()
