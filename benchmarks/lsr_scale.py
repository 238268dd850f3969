"""Does LSR generalise with more questions? (issue 21: at 600 questions it fits them and moves no test metric.)

    PYTHONPATH=. python benchmarks/lsr_scale.py --out /tmp/lsr_scale --rounds 8 --set train.num-examples=473

Centralized LSR (`run_local_round`, the code every node runs) over all 3,778 Web Questions training questions, on
the full-corpus store of the embedding cache, with the quality table's LSR settings (lr 3e-5, 256 tokens) unless
--set says otherwise. After every round the retriever alone is evaluated on the first 500 Web Questions test
questions (answer recall@10, MRR@10: no generation, seconds), so the curve shows when the test metrics move.
One JSON line per round in <out>/metrics.jsonl; the final retriever in <out>/retriever (sentence-transformers).
The LM-score cache (docs/LSR.md) makes a second run over the same candidates cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrag_app.cli import load_config  # noqa: E402
from fedrag_app.config.runtime import apply_runtime  # noqa: E402
from fedrag_app.data.loaders import load_web_questions  # noqa: E402
from fedrag_app.evaluation.evaluate import evaluate_retrieval  # noqa: E402
from fedrag_app.rag.generator import load_generator  # noqa: E402
from fedrag_app.rag.pipeline import open_store  # noqa: E402
from fedrag_app.rag.retrieval import retrieve  # noqa: E402
from fedrag_app.rag.retriever import load_retriever  # noqa: E402
from fedrag_app.training.local_round import run_local_round  # noqa: E402

TABLE_LSR = ["train.mode=lsr", "lsr.max-seq-len=256", "lsr.learning-rate=3e-5"]  # quality_full.toml's LSR row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--test-questions", type=int, default=500)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="run-config override (repeatable)")
    args = parser.parse_args()
    cfg = load_config(None, TABLE_LSR + args.sets)
    device = apply_runtime(cfg.runtime)
    gen = load_generator(cfg.generator, device=device)
    retriever = load_retriever(cfg.retriever, device=device)
    train = load_web_questions("train", cfg.data)  # all 3,778: each round takes the next train.num-examples
    test = load_web_questions("test", cfg.data, args.test_questions)
    args.out.mkdir(parents=True, exist_ok=True)
    with open_store(cfg, retriever) as store, open(args.out / "metrics.jsonl", "w") as log:

        def test_retrieval() -> dict[str, float]:
            return evaluate_retrieval(retrieve(retriever, store, [e.question for e in test], 10), test, 10)

        rows = [{"round": 0, **test_retrieval()}]
        log.write(json.dumps(rows[0]) + "\n")
        for r in range(1, args.rounds + 1):
            start = time.perf_counter()
            result = run_local_round(cfg, gen, retriever, store, train, server_round=r)
            rows.append({"round": r, "seconds": time.perf_counter() - start, **result.metrics, **test_retrieval()})
            log.write(json.dumps(rows[-1]) + "\n")
            log.flush()
            print(
                f"round {r}: {rows[-1]['seconds']:.0f} s, LM scores cached {rows[-1].get('lsr-scores-cached', 0):.2f}, "
                f"test recall@10 {rows[-1]['retrieval-recall@10']:.3f}, MRR@10 {rows[-1]['retrieval-mrr@10']:.3f}",
                flush=True,
            )
    retriever.save(args.out / "retriever")
    print("| round | questions | test recall@10 | test MRR@10 |\n|---|---|---|---|")
    for row in rows:
        seen = row["round"] * cfg.train.num_examples if cfg.train.num_examples else row["round"] * len(train)
        print(f"| {row['round']} | {seen} | {row['retrieval-recall@10']:.3f} | {row['retrieval-mrr@10']:.3f} |")


if __name__ == "__main__":
    main()
