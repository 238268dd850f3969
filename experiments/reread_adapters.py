"""Re-read a table's kept adapters under the prior-free MMLU protocols: evaluation only, no retraining.

    python experiments/reread_adapters.py results/quality_full

Each adapter under <table>/adapters/ (and the untuned base model) is evaluated with `fedrag-app evaluate` on MMLU
global_facts (every protocol) and the broad 57-subject sample (eval.mmlu-subject = all), closed-book by default
(the model's own knowledge, which is what fine-tuning might cost; --retrieval asks the table's top-1 full-corpus store
instead). Results and per-question predictions go to <table>/reread/, one file per adapter, so a stopped run resumes
where it stopped; then <table>/reread/summary.md compares each adapter with the untuned model question by question
(fedrag_app/evaluation/paired.py) and gives every protocol's predicted-letter shares.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from fedrag_app.core.atomic import write_json, write_text  # noqa: E402
from fedrag_app.evaluation.paired import compare  # noqa: E402

PROTOCOLS = ("loglik", "generate", "circular", "cloze")
SETS = {"mmlu": "global_facts", "mmlu-all": "broad sample (57 x 20)"}


def evaluate(adapter: Path | None, out: Path, retrieval: bool) -> None:
    flags = [
        "--set", "eval.mmlu-subject=global_facts,all",
        "--set", "eval.mmlu-protocols=loglik,generate,circular,cloze",
        "--set", "eval.mmlu-broad-protocols=loglik,circular,cloze",
        "--set", "eval.web-questions-limit=1",
        "--set", "runtime.num-threads=0",
    ]  # fmt: skip
    flags += ["--set", "eval.top-k=1", "--set", "store.passages-limit=0"] if retrieval else ["--no-retrieval"]
    if adapter is not None:  # relative to the checkout (the subprocess runs there): results name no machine's paths
        flags += ["--adapter", os.path.relpath(adapter, REPO)]
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(BIN / "fedrag-app"), "evaluate", "--output", str(out.with_suffix(".json")), "--predictions",
         str(out.with_suffix(".jsonl")), *flags],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def summarise(folder: Path, names: list[str]) -> str:
    base = [json.loads(line) for line in (folder / "untuned.jsonl").read_text().splitlines()]
    lines = [
        "# MMLU re-read of the kept adapters (closed-book unless the file names say otherwise)",
        "",
        "Accuracy per protocol; for each tuned adapter the difference from the untuned model on the same questions",
        "with its 95% paired-bootstrap interval and the questions gained/lost (sign-test p). Letter shares: the",
        "predicted letters (circular and cloze: the chosen choice's original position).",
        "",
    ]
    for set_name, title in SETS.items():
        lines += [f"## {title}", "", "| adapter | " + " | ".join(PROTOCOLS) + " | letter shares A/B/C/D (loglik) |"]
        lines.append("|---|" + "---|" * (len(PROTOCOLS) + 1))
        for name in names:
            result = json.loads((folder / f"{name}.json").read_text())["results"]
            prefix = "mmlu-" if set_name == "mmlu" else "mmlu-all-"
            paired = {} if name == "untuned" else compare(base, [_records(folder / f"{name}.jsonl")])
            cells = []
            for protocol in PROTOCOLS:
                acc = result.get(f"{prefix}{protocol}-accuracy")
                p = paired.get(f"{set_name}-{protocol}-accuracy")
                cells.append(
                    "–"
                    if acc is None
                    else f"{acc:.3f}"
                    if p is None
                    else f"{acc:.3f} ({p['diff']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] "
                    f"{p['gained']:.0f}/{p['lost']:.0f} p={p['sign-p']:.2g})"
                )
            shares = "/".join(f"{result[f'{prefix}loglik-pred-{x}']:.2f}" for x in "ABCD")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {shares} |")
        baseline = json.loads((folder / "untuned.json").read_text())["results"]
        prefix = "mmlu-" if set_name == "mmlu" else "mmlu-all-"
        lines += ["", f"Majority-letter baseline of these questions: {baseline[f'{prefix}majority-baseline']:.3f}.", ""]
    return "\n".join(lines + spreads(folder, names))


def spreads(folder: Path, names: list[str]) -> list[str]:
    """How much a question's choices differ in score (median over questions of best minus worst): a model whose
    multiple-choice answer depends less on what the options say shows a smaller circular spread, while the cloze
    spread tells whether its likelihood of the answers' texts still tells them apart."""
    lines = [
        "## How much the choices' content moves the scores",
        "",
        "Median over questions of the best minus the worst choice's score (circular: mean log-probability of the",
        "choice's letter over the four positions; cloze: log-likelihood of its text per character).",
        "",
        "| adapter | " + " | ".join(f"{t}: {p}" for t in SETS.values() for p in ("circular", "cloze")) + " |",
        "|---|" + "---|" * 2 * len(SETS),
    ]
    for name in names:
        records = _records(folder / f"{name}.jsonl")
        cells = []
        for set_name in SETS:
            for protocol in ("circular", "cloze"):
                gaps = [
                    max(r[protocol]["scores"]) - min(r[protocol]["scores"]) for r in records if r.get("set") == set_name
                ]
                cells.append(f"{statistics.median(gaps):.3f}" if gaps else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def main(
    table: Path = typer.Argument(..., help="a results/<table> folder with adapters/"),
    retrieval: bool = typer.Option(False, help="top-1 passage from the full-corpus store instead of closed-book"),
    only: list[str] = typer.Option([], help="re-read only these adapters (names as in the summary), in this order"),
) -> None:
    table = table.resolve()
    folder = table / ("reread-rag" if retrieval else "reread")
    adapters = {
        str(p.parent.relative_to(table / "adapters")).replace("/", "_"): p.parent
        for p in sorted((table / "adapters").rglob("adapter_config.json"))
    }
    names = ["untuned"] + (only or list(adapters))
    for name in names:
        out = folder / name
        if not out.with_suffix(".json").exists():
            typer.echo(f"re-reading {name}")
            evaluate(adapters.get(name), out, retrieval)
        done = [n for n in ["untuned", *adapters] if (folder / f"{n}.json").exists()]  # this run's and earlier runs'
        write_text(folder / "summary.md", summarise(folder, done))
    write_json(folder / "adapters.json", {n: str(p.relative_to(REPO)) for n, p in adapters.items()})


if __name__ == "__main__":
    typer.run(main)
