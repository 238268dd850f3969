"""Do two table cells' retrieval figures come from the same evaluation store? A check for a no-change control.

    PYTHONPATH=. python benchmarks/eval_store_drift.py results/lsr_gain/predictions/evaluate/*/seed-1.jsonl \
        results/lsr_gain/predictions/centralized/ralt/seed-1.jsonl

Each file is a cell's per-question predictions (run_table keeps them) from a cell whose retriever is the untuned one
(an evaluation row, or RALT, which trains only the generator). The untuned retriever searches this machine's
evaluation store (the full corpus, as the tables use it) for the same Web Questions, and the script counts the
questions whose top-k list differs from each file's, from the graph search (HNSW, what evaluation uses) and from an
exact scan. The HNSW graph is built once per machine from the embedding cache, and a graph built again need not be
the same: a cell evaluated on another machine's store differs in a few lists, one evaluated on this store in none.
It also checks that the query vectors do not depend on how many questions are encoded together.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedrag_app.cli import load_config  # noqa: E402
from fedrag_app.config.runtime import apply_runtime  # noqa: E402
from fedrag_app.rag.pipeline import open_store  # noqa: E402
from fedrag_app.rag.retriever import load_retriever  # noqa: E402

FULL_CORPUS = ["store.passages-limit=0"]  # the tables' evaluation store


def web_questions(path: Path) -> dict[str, dict]:
    """id -> {question, retrieved} of a predictions file's Web Questions rows."""
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["id"]: r for r in rows if r.get("dataset") == "web_questions"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", nargs="+", type=Path, help="cells' predictions (.jsonl), untuned retriever")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="run-config override (repeatable)")
    args = parser.parse_args()
    cells = {p: web_questions(p) for p in args.predictions}
    first = cells[args.predictions[0]]
    for path, rows in cells.items():
        if not rows:
            parser.error(f"{path}: no Web Questions rows")
        if rows.keys() != first.keys():
            parser.error(f"{path}: not the same questions as {args.predictions[0]}")
    ids = list(first)
    questions = [first[i]["question"] for i in ids]
    cfg = load_config(None, FULL_CORPUS + args.sets)
    untuned = load_retriever(cfg.retriever, device=apply_runtime(cfg.runtime))
    together = untuned.encode_queries(questions).cpu().numpy()
    by_ten = np.concatenate(
        [untuned.encode_queries(questions[s : s + 10]).cpu().numpy() for s in range(0, len(ids), 10)]
    )
    with open_store(cfg, untuned) as store:
        graph = [[h.id for h in hits] for hits in store.search_batch(together, args.k)]
        graph_by_ten = [[h.id for h in hits] for hits in store.search_batch(by_ten, args.k)]
        exact = [[h.id for h in hits] for hits in store.search_batch(together, args.k, exact=True)]

    def differ(a: list[list[str]], b: list[list[str]]) -> int:
        return sum(x != y for x, y in zip(a, b))

    print(f"{len(ids)} Web Questions, top {args.k}, the untuned retriever on this machine's store")
    gap = np.abs(together - by_ten).max()
    print(f"query vectors, {len(ids)} at a time against 10 at a time: max |difference| {gap:.1e}")
    print(f"graph search, queries encoded 10 at a time: {differ(graph_by_ten, graph)} lists differ")
    print(f"exact scan against graph search: {differ(exact, graph)} lists differ")
    print("| cell's predictions | lists differing from this store's graph search | from an exact scan |\n|---|---|---|")
    for path, rows in cells.items():
        kept = [rows[i]["retrieved"][: args.k] for i in ids]
        name = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path.name
        print(f"| {name} | {differ(kept, graph)} | {differ(kept, exact)} |")


if __name__ == "__main__":
    main()
