"""Run one experiments table: every (column, row, seed) cell as a real `flwr run .` (or `fedrag-app evaluate` for
rows that train nothing), then mean ± std over seeds as markdown, JSON and a PNG.

    python experiments/run_table.py experiments/tables/privacy_aggregation.toml

A table file names its partitions (one `fedrag-app partition` per column, or per column and seed with
`partition-per-seed = true`), the run-config shared by every cell, its rows (run-config overrides) and seeds. Each
cell's per-question predictions are kept beside its result; with `baseline = "<row name>"` every other row is
compared with that row question by question (fedrag_app/evaluation/paired.py: mean difference, 95% paired-bootstrap
interval, questions gained/lost and the sign test), per row over its seeds; `gain-share = {metric, row, column}`
adds each row's share of that reference cell's gain. Finished cells are kept
(`results/<table>/cells/.../seed-N.json`), so an interrupted table resumes where it stopped; --fresh starts over. The
result table is rewritten after every cell. `keep-adapters` / `keep-retrievers` keep each training cell's final LoRA
adapter / retriever (its trainable weights' fp16 update against the base; restore_retriever rebuilds it) under
results/<table>/adapters|retrievers/. A run-config string may name
"{repo}" (this checkout) and "{seed}" (the cell's seed), e.g. a per-seed lsr.scorer-adapter.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))  # this checkout's fedrag_app

from fedrag_app.config.values import toml_value  # noqa: E402
from fedrag_app.core.atomic import atomic_dir, atomic_path, write_json, write_text  # noqa: E402
from fedrag_app.evaluation.paired import compare, gain_share  # noqa: E402
from fedrag_app.federation import follow_run  # noqa: E402

console = Console()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def paired_metrics(table: dict) -> list[str]:
    """The metrics a table pairs against its baseline: `paired-metrics`, or else every metric it shows."""
    return table.get("paired-metrics", table["metrics"])


def load_table(path: Path) -> dict:
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise typer.BadParameter(f"table file {path}: {e}") from e
    for key in ("name", "seeds", "metrics", "rows", "columns"):
        if key not in table:
            raise typer.BadParameter(f"table file {path}: missing top-level key '{key}'")
    if (share := table.get("gain-share")) is not None:
        rows, columns = [r["name"] for r in table["rows"]], [c["name"] for c in table["columns"]]
        if not isinstance(share, dict) or set(share) != {"metric", "row", "column"}:
            raise typer.BadParameter(f"table file {path}: gain-share takes exactly metric, row and column; got {share}")
        if (
            share["row"] not in rows
            or share["column"] not in columns
            or share["row"] == table.get("baseline", share["row"])
        ):
            raise typer.BadParameter(
                f"table file {path}: gain-share names row {share['row']!r} and column {share['column']!r}; the table "
                f"has rows {rows}, columns {columns}, and needs a baseline row other than that row"
            )
        if share["metric"] not in paired_metrics(table):
            raise typer.BadParameter(
                f"table file {path}: gain-share metric {share['metric']!r} is not among the paired metrics "
                f"{paired_metrics(table)}"
            )
    return table


def partition(column: dict, folder: Path, env: dict, seed: int | None = None) -> None:
    """The column's institutions: questions and one Qdrant shard each (kept if already built); with ``seed``, the
    split that seed draws (each seed its own institutions' data), else runtime.seed's default."""
    if (folder / "manifest.json").exists():
        return
    argv = [
        str(BIN / "fedrag-app"),
        "partition",
        "-n",
        str(column["num-partitions"]),
        "--scheme",
        column["scheme"],
        "--out",
        str(folder),
    ] + [arg for k, v in column.get("partition", {}).items() for arg in ("--set", f"{k}={toml_value(v, k)}")]
    if seed is not None:
        argv += ["--set", f"runtime.seed={seed}"]
    subprocess.run(argv, check=True, env=env)


def index_server_store(table: dict, env: dict) -> None:
    """The shard the server evaluates with (store.* keys of the table's run-config); kept if already built."""
    if table.get("run", {}).get("fed.server-eval", True) is False and all(
        r.get("kind") != "evaluate" for r in table["rows"]
    ):
        return
    flags = [
        arg
        for k, v in table.get("run", {}).items()
        if k.startswith("store.")
        for arg in ("--set", f"{k}={toml_value(v, k)}")
    ]
    subprocess.run([str(BIN / "fedrag-app"), "index", *flags], check=True, env=env, stdout=subprocess.DEVNULL)


def run_cell(table: dict, column: dict, row: dict, seed: int, parts: Path, out: Path, env: dict) -> dict:
    """One training run (flwr run, simulation) or one evaluation; returns the final metrics."""
    run = {**table.get("run", {}), **column.get("run", {}), **row.get("run", {}), "runtime.seed": seed}
    run = {k: expand(v, seed) for k, v in run.items()}
    started = time.perf_counter()
    if row.get("kind") == "evaluate":
        run["runtime.num-threads"] = 0  # alone on the machine: every core (simulation nodes share them instead)
        flags = [
            arg
            for k, v in run.items()
            if not k.startswith(("fed.", "partition.", "dp."))
            for arg in ("--set", f"{k}={toml_value(v, k)}")
        ]
        predictions = ["--predictions", str(out / "predictions.jsonl")]
        subprocess.run(
            [str(BIN / "fedrag-app"), "evaluate", "--output", str(out / "evaluate.json"), *predictions, *flags],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        metrics = json.loads((out / "evaluate.json").read_text())["results"]
    else:
        run.update({"partition.dir": str(parts), "fed.output-dir": str(out), "fed.min-nodes": column["num-partitions"]})
        items = [f"{k}={toml_value(v, k)}" for k, v in run.items()]
        run_id = follow_run.launch_run(
            str(REPO),
            "local",
            items,
            flwr=str(BIN / "flwr"),
            env=env,
            federation_config=f"num-supernodes={column['num-partitions']}",
        )
        # Each `flwr ls` costs ~1.8 s of CPU: polled every 3 s it took a third of a core from a 2-core cell.
        status = follow_run.wait_for_run(
            "local",
            run_id,
            timeout_s=table.get("cell-timeout-s", 3600),
            poll_s=table.get("poll-seconds", 20),
            flwr=str(BIN / "flwr"),
            env=env,
        )
        if status != follow_run.COMPLETED:
            raise RuntimeError(f"run {run_id} ({row['name']}, seed {seed}) ended {status}: see `flwr log {run_id}`")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if failed := [r["round"] for r in rows if r.get("round-failures", 0) > 0]:
            raise RuntimeError(
                f"run {run_id} ({row['name']}, seed {seed}): nodes failed in rounds {failed}, so the "
                f"average is not over every institution; see `flwr log {run_id}`"
            )
        metrics = rows[-1]
    return {
        "row": row["name"],
        "column": column["name"],
        "seed": seed,
        "run-config": run,
        "wall-seconds": time.perf_counter() - started,
        "metrics": metrics,
    }


TOKENIZER_FILES = ("tokenizer*", "chat_template.jinja", "special_tokens_map.json", "vocab.json", "merges.txt")


def keep_adapter(cell_out: Path, dest: Path) -> Path | None:
    """Copy a training cell's final global adapter (PEFT folder, ~1.9 MB for SmolLM2's rank-8 q/v LoRA) to ``dest``,
    so anyone can evaluate it on other data without re-training; None when the cell trained no adapter (LSR). The
    base model's tokenizer files are left out (3.5 MB a copy, and the base model has them)."""
    rounds = sorted(cell_out.glob("round-[0-9]*"), key=lambda p: int(p.name.split("-")[1]))
    if not rounds or rounds[-1].name.startswith("."):
        return None
    state = json.loads((rounds[-1] / "state.json").read_text())
    mode = state.get("config", {}).get("train.mode")
    if mode not in ("ralt", "ra-dit"):
        return None
    with atomic_dir(dest) as tmp:
        skip = shutil.ignore_patterns(*TOKENIZER_FILES)
        shutil.copytree(rounds[-1] / "adapter", tmp, dirs_exist_ok=True, ignore=skip)
        config = {k: repo_relative(v) for k, v in state.get("config", {}).items()}
        write_json(tmp / "round.json", {"round": state["round"], "run-config": config}, indent=1)
    return dest


def expand(value, seed: int):
    """A table's run-config value with "{repo}" (this checkout, absolute: nodes need it so) and "{seed}" (the cell's)
    filled in, e.g. lsr.scorer-adapter = "{repo}/results/quality_full/adapters/centralized/ralt/seed-{seed}"."""
    if isinstance(value, str) and ("{repo}" in value or "{seed}" in value):
        return value.replace("{repo}", str(REPO)).replace("{seed}", str(seed))
    return value


def _cell_retriever_config(config: dict):
    """The RetrieverConfig a cell ran with, from its recorded run-config's retriever.* keys."""
    from fedrag_app.config.app_config import AppConfig

    return AppConfig.from_flat({k: v for k, v in config.items() if k.startswith("retriever.")}).retriever


def _trainable_fingerprint(state: dict) -> str:
    """sha256 over a retriever's trainable weights (keys, shapes, fp32 bytes): names the base an update applies to."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        h.update(f"{key}:{tuple(state[key].shape)}".encode())
        h.update(state[key].astype("float32").tobytes())
    return h.hexdigest()


def keep_retriever(cell_out: Path, dest: Path) -> Path | None:
    """Save a training cell's final retriever as ``dest``/update.safetensors: its trainable weights (query encoder's
    top retriever.train-top-layers layers, + the context encoder's when it trains) minus the base retriever's, in
    fp16, under the exchange keys ("retriever.query.<param>"). fp16 keeps ~3 digits of an update, where rounding the
    weights themselves would lose most of a small LSR update; 7 MB a cell with MiniLM-L6's top 2 layers, against 14 MB
    of fp32 weights and ~90 MB for the sentence-transformers folders. round.json records the run-config, the base's
    fingerprint and the largest rounding error; restore_retriever rebuilds the retriever. None when the cell trained
    no retriever (RALT)."""
    rounds = sorted(cell_out.glob("round-[0-9]*"), key=lambda p: int(p.name.split("-")[1]))
    if not rounds or rounds[-1].name.startswith("."):
        return None
    state = json.loads((rounds[-1] / "state.json").read_text())
    config = state.get("config", {})
    if config.get("train.mode") not in ("lsr", "ra-dit"):
        return None
    import numpy as np
    from safetensors.numpy import save_file

    from fedrag_app.federation.exchange import flat_state, from_wire_update, to_wire_update
    from fedrag_app.rag.retriever import load_retriever

    wanted = _cell_retriever_config(config)
    base = flat_state({}, load_retriever(wanted).trainable_state_dict())
    trained = flat_state({}, load_retriever(wanted, path=str(rounds[-1] / "retriever")).trainable_state_dict())
    update = to_wire_update(trained, base, "float16")
    rebuilt = from_wire_update(update, base)
    with atomic_dir(dest) as tmp:
        save_file(update, str(tmp / "update.safetensors"))
        write_json(
            tmp / "round.json",
            {
                "round": state["round"],
                "stored": "update.safetensors: trained minus base trainable weights, fp16; restore_retriever adds "
                "them back to the base retriever.model",
                "base-fingerprint": _trainable_fingerprint(base),
                "max-abs-update": float(max(np.abs(trained[k] - base[k]).max() for k in trained)),
                "max-abs-rounding-error": float(max(np.abs(rebuilt[k] - trained[k]).max() for k in trained)),
                "run-config": {k: repo_relative(v) for k, v in config.items()},
            },
            indent=1,
        )
    return dest


def restore_retriever(kept: Path):
    """The retriever keep_retriever saved in ``kept``: the base retriever its run-config names, plus the fp16
    update, as a DualEncoder (``.save(folder)`` makes it a folder `fedrag-app evaluate --retriever` reads). A base
    whose trainable weights differ from the one the update was taken against is refused by name."""
    from safetensors.numpy import load_file

    from fedrag_app.core.errors import WeightsError
    from fedrag_app.federation.exchange import flat_state, from_wire_update, split_state
    from fedrag_app.rag.retriever import load_retriever

    meta = json.loads((kept / "round.json").read_text())
    wanted = _cell_retriever_config(meta["run-config"])
    retriever = load_retriever(wanted)
    base = flat_state({}, retriever.trainable_state_dict())
    if _trainable_fingerprint(base) != meta["base-fingerprint"]:
        raise WeightsError(
            f"{kept}/round.json: the update was taken against another base than retriever.model "
            f"{wanted.model!r} loads now (trainable-weight fingerprints differ)"
        )
    try:
        weights = from_wire_update(load_file(str(kept / "update.safetensors")), base)
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{kept}/update.safetensors does not fit {wanted.model!r}: {e}") from e
    retriever.load_trainable_state_dict(split_state(weights, {}, retriever.trainable_state_dict())[1])
    return retriever


def repo_relative(value):
    """A run-config value as kept in git: a path inside this checkout relative to it (flwr needs it absolute, the
    record does not; no machine's folder layout in the results)."""
    if isinstance(value, str) and value.startswith(f"{REPO}/"):
        return value[len(str(REPO)) + 1 :]
    return value


def cell_predictions(out: Path) -> Path | None:
    """A finished cell's per-question predictions: an evaluation's file, or the server's last evaluated round's."""
    if (out / "predictions.jsonl").exists():
        return out / "predictions.jsonl"
    rounds = sorted((out / "predictions").glob("round-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    return rounds[-1] if rounds else None


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def paired_rows(table: dict, results: list[dict], predictions_of) -> list[dict]:
    """Every row but the baseline against the baseline row, per column, question by question over the row's seeds
    (fedrag_app/evaluation/paired.py); [] when the table names no baseline or its predictions are missing."""
    name = table.get("baseline")
    base_cells = [r for r in results if r["row"] == name]
    base_file = predictions_of(base_cells[0]) if base_cells else None
    if base_file is None:
        return []
    base = read_predictions(base_file)
    recall_k = int(table.get("run", {}).get("eval.recall-k", 10))

    def runs_of(row: str, column: str) -> tuple[list[int], list[list[dict]]]:
        cells = [r for r in results if r["row"] == row and r["column"] == column and row != name]
        found = [(r["seed"], f) for r in cells if (f := predictions_of(r)) is not None]
        return [seed for seed, _ in found], [read_predictions(f) for _, f in found]

    share = table.get("gain-share")  # {metric, row, column}: each row's share of that reference cell's gain
    ref_seeds, reference = runs_of(share["row"], share["column"]) if share else ([], [])
    out = []
    for column in table["columns"]:
        for row in table["rows"]:
            is_reference = share is not None and (row["name"], column["name"]) == (share["row"], share["column"])
            seeds, runs = (ref_seeds, reference) if is_reference else runs_of(row["name"], column["name"])
            if runs:
                entry = {
                    "row": row["name"],
                    "column": column["name"],
                    "baseline": name,
                    "seeds": len(runs),
                    "seed-list": seeds,
                    "metrics": compare(base, runs, recall_k=recall_k),
                }
                if reference and not is_reference:
                    kept = gain_share(base, reference, runs, share["metric"], recall_k=recall_k)
                    if kept is not None:
                        entry["gain-share"] = {"metric": share["metric"], "of": [share["row"], share["column"]], **kept}
                out.append(entry)
    return out


def seed_comparisons(paired: list[dict], metrics: list[str]) -> dict[tuple[str, str, int], dict]:
    """(row, column, seed) -> each metric's comparison of that one seed against the baseline: difference, 95%
    interval, questions gained/lost and sign-test p (what results.json carries per cell as 'paired')."""
    out: dict[tuple[str, str, int], dict] = {}
    for p in paired:
        for i, seed in enumerate(p["seed-list"]):
            out[(p["row"], p["column"], seed)] = {
                metric: {
                    "diff": m["diff-per-run"][i],
                    "low": m["low-per-run"][i],
                    "high": m["high-per-run"][i],
                    "gained": m["gained-per-run"][i],
                    "lost": m["lost-per-run"][i],
                    "sign-p": m["sign-p-per-run"][i],
                }
                for metric in metrics
                if (m := p["metrics"].get(metric)) is not None
            }
    return out


def summarise_paired(table: dict, paired: list[dict]) -> str:
    """Markdown: per column, each row's mean difference against the baseline with its 95% paired interval,
    questions gained/lost and the sign test's p seed by seed, and how many seeds confirm a change on their own."""
    if not paired:
        return ""
    metrics = paired_metrics(table)
    lines = [
        f"## Paired against '{table['baseline']}' (same questions; difference, 95% bootstrap interval over "
        "questions, each question averaged over the row's seeds; gained/lost (F1, MRR: rose/fell) and sign-test p, "
        "seed by seed; ↑ n/S: the seeds whose own sign test has p < 0.05 and whose own interval lies above 0, "
        "↓ below)",
        "",
    ]
    for column in table["columns"]:
        rows = [p for p in paired if p["column"] == column["name"]]
        if not rows:
            continue
        lines += [f"### {column['name']}", "", "| row | seeds | " + " | ".join(metrics) + " |"]
        lines.append("|---|---|" + "---|" * len(metrics))
        for p in rows:
            cells = []
            for metric in metrics:
                m = p["metrics"].get(metric)
                if m is None:
                    cells.append("–")
                    continue
                text = f"{m['diff']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"
                per_seed = zip(m["gained-per-run"], m["lost-per-run"], m["sign-p-per-run"])  # each seed: its own test
                text += " " + ", ".join(f"{g:.0f}/{x:.0f} p={q:.2g}" for g, x, q in per_seed)
                for arrow, key in (("↑", "confirmed-gain-runs"), ("↓", "confirmed-loss-runs")):
                    if m[key]:
                        text += f" {arrow}{m[key]:.0f}/{p['seeds']}"
                cells.append(text)
            lines.append(f"| {p['row']} | {p['seeds']} | " + " | ".join(cells) + " |")
        lines.append("")
    if shares := [p for p in paired if "gain-share" in p]:
        ref = table["gain-share"]
        lines += [
            f"## Share of the {ref['metric']} gain of '{ref['row']}' ({ref['column']}) over the baseline",
            "",
            "Each row's mean gain over the reference's, with a 95% interval over questions (one resample for both",
            "gains), and each seed's own gain over the reference's mean gain.",
            "",
            "| row | column | seeds | share | by seed |",
            "|---|---|---|---|---|",
        ]
        for p in shares:
            g = p["gain-share"]
            by_seed = ", ".join(f"{x:.1%}" for x in g["share-per-run"])
            low = "−∞" if g["low"] is None else f"{g['low']:.1%}"
            high = "∞" if g["high"] is None else f"{g['high']:.1%}"
            share = f"{g['share']:.1%} [{low}, {high}]"
            lines.append(f"| {p['row']} | {p['column']} | {p['seeds']} | {share} | {by_seed} |")
        lines.append("")
    return "\n".join(lines)


def _number(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.3g}"


def summarise(table: dict, results: list[dict]) -> str:
    """Markdown: one table per column, rows x metrics, mean ± std over the seeds that finished."""
    lines = [f"# {table.get('title', table['name'])}", "", table.get("description", "").strip(), ""]
    for column in table["columns"]:
        lines += [
            f"## {column['name']}",
            "",
            "| row | n | " + " | ".join(table["metrics"]) + " |",
            "|---|---|" + "---|" * len(table["metrics"]),
        ]
        for row in table["rows"]:
            if column["name"] not in row.get("columns", [column["name"]]):
                continue  # a row the table never runs in this column: no line of dashes
            cells = [r for r in results if r["row"] == row["name"] and r["column"] == column["name"]]
            values = []
            for metric in table["metrics"]:
                xs = [float(r["metrics"][metric]) for r in cells if metric in r["metrics"]]
                values.append(
                    "–"
                    if not xs
                    else _number(statistics.mean(xs))
                    if len(xs) == 1
                    else f"{_number(statistics.mean(xs))} ± {_number(statistics.stdev(xs))}"
                )
            lines.append(f"| {row['name']} | {len(cells)} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(table: dict, results: list[dict], path: Path) -> None:
    """Bar chart of the first metric per row (one group per column), error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = table["metrics"][0]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(table["rows"]) * len(table["columns"])), 4))
    width = 0.8 / len(table["columns"])
    for j, column in enumerate(table["columns"]):
        means, stds = [], []
        for row in table["rows"]:
            xs = [
                float(r["metrics"][metric])
                for r in results
                if r["row"] == row["name"] and r["column"] == column["name"] and metric in r["metrics"]
            ]
            means.append(statistics.mean(xs) if xs else 0.0)
            stds.append(statistics.stdev(xs) if len(xs) > 1 else 0.0)
        ax.bar(
            [i + j * width for i in range(len(table["rows"]))], means, width, yerr=stds, label=column["name"], capsize=3
        )
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(table["rows"]))],
        [r["name"] for r in table["rows"]],
        rotation=20,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def ordered_cells(
    table: dict, only_rows: list[str] | None = None, only_columns: list[str] | None = None
) -> list[tuple[dict, dict, int]]:
    """Every (column, row, seed) cell, seed-major: every row gets its first seed before any row gets its second, so a
    table stopped early still covers every row. `only_rows` / `only_columns` keep the named rows' / columns' cells (a
    name the table lacks is an error, not an empty run)."""
    for kind, wanted in (("row", only_rows), ("column", only_columns)):
        names = [x["name"] for x in table[f"{kind}s"]]
        if unknown := [n for n in wanted or [] if n not in names]:
            raise typer.BadParameter(f"no {kind} named {unknown[0]!r} in table {table['name']!r}; its {kind}s: {names}")
    return [
        (c, r, s)
        for i, s in enumerate(table["seeds"])
        for c in table["columns"]
        for r in table["rows"]
        if (i == 0 or r.get("kind") != "evaluate")
        and s in r.get("seeds", table["seeds"])
        and c["name"] in r.get("columns", [c["name"] for c in table["columns"]])
        and (not only_rows or r["name"] in only_rows)
        and (not only_columns or c["name"] in only_columns)
    ]


def main(
    table_file: Path = typer.Argument(..., help="a table TOML in experiments/tables/"),
    results_dir: Path = typer.Option(REPO / "results", help="where results/<table>/ goes"),
    fresh: bool = typer.Option(False, help="discard finished cells and run everything again"),
    summarise_only: bool = typer.Option(False, help="only rewrite the table from the cells finished so far"),
    rows: list[str] = typer.Option(
        [], "--row", help="run only this row's cells (repeatable); the table still shows every finished cell"
    ),
    columns: list[str] = typer.Option([], "--column", help="run only this column's cells (repeatable)"),
) -> None:
    table = load_table(table_file)
    root = results_dir / table["name"]
    runs = root / "runs"
    root.mkdir(parents=True, exist_ok=True)
    if fresh and runs.exists():
        subprocess.run(["rm", "-rf", str(runs)], check=True)
    env = follow_run.local_flwr_env(root / "flwr_home", bin_dir=BIN)
    cells = ordered_cells(table)
    todo = ordered_cells(table, only_rows=rows, only_columns=columns)

    def cell_dir(column: dict, row: dict, seed: int) -> Path:
        trains = row.get("kind") != "evaluate"  # an evaluation trains nothing: one run serves every column
        return runs / (slug(column["name"]) if trains else "evaluate") / slug(row["name"]) / f"seed-{seed}"

    def partitions_of(column: dict, seed: int) -> Path:
        """The column's institutions: one split per seed with `partition-per-seed`, else one for every seed."""
        folder = root / "partitions" / slug(column["name"])
        return folder / f"seed-{seed}" if table.get("partition-per-seed") else folder

    def result_file(column: dict, row: dict, seed: int) -> Path:
        """A cell's final metrics, kept in git (its checkpoints and logs in runs/ are not)."""
        return root / "cells" / cell_dir(column, row, seed).relative_to(runs).with_suffix(".json")

    def finished() -> list[dict]:
        """Every cell with a result on disk, whichever run of this command produced it."""
        return [
            {**json.loads(done.read_text()), "column": c["name"]}
            for c, r, s in cells
            if (done := result_file(c, r, s)).exists()
        ]

    def predictions_file(column: dict, row: dict, seed: int) -> Path:
        """A cell's per-question predictions, kept in git beside its result."""
        return root / "predictions" / cell_dir(column, row, seed).relative_to(runs).with_suffix(".jsonl")

    def predictions_of(result: dict) -> Path | None:
        column = next(c for c in table["columns"] if c["name"] == result["column"])
        row = next(r for r in table["rows"] if r["name"] == result["row"])
        path = predictions_file(column, row, result["seed"])
        return path if path.exists() else None

    def report() -> list[dict]:
        results = finished()
        paired = paired_rows(table, results, predictions_of)
        by_seed = seed_comparisons(paired, paired_metrics(table))
        for r in results:  # each cell against the baseline on its own, beside its metrics
            if (key := (r["row"], r["column"], r["seed"])) in by_seed:
                r["paired"] = by_seed[key]
        write_text(root / "table.md", summarise(table, results) + "\n" + summarise_paired(table, paired))
        write_json(root / "results.json", results, indent=1, sort_keys=False)
        if paired:
            write_json(root / "paired.json", paired, indent=1, sort_keys=False)
        plot(table, results, root / "table.png")
        return results

    if summarise_only:
        results = report()
    else:
        # `kill` (SIGTERM) stops the table like Ctrl-C does: the `finally` below then stops the local SuperLink and
        # the simulation it runs, and subprocess.run kills a partition or evaluation in flight; no orphan keeps the
        # cores busy. The cell in flight has no result file, so the next run of this command runs it again.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            index_server_store(table, env)
            with Progress(console=console) as progress:
                task = progress.add_task(table["name"], total=len(todo))
                for column, row, seed in todo:
                    out = cell_dir(column, row, seed)
                    if not result_file(column, row, seed).exists():
                        parts = partitions_of(column, seed)
                        if row.get("kind") != "evaluate":
                            partition(column, parts, env, seed if table.get("partition-per-seed") else None)
                        out.mkdir(parents=True, exist_ok=True)
                        progress.console.print(f"[bold]{column['name']} · {row['name']} · seed {seed}[/]")
                        result = run_cell(table, column, row, seed, parts, out, env)
                        if (found := cell_predictions(out)) is not None:
                            predictions_file(column, row, seed).parent.mkdir(parents=True, exist_ok=True)
                            shutil.copyfile(found, predictions_file(column, row, seed))
                        if table.get("keep-adapters") and row.get("kind") != "evaluate":
                            keep_adapter(out, root / "adapters" / cell_dir(column, row, seed).relative_to(runs))
                        if table.get("keep-retrievers") and row.get("kind") != "evaluate":
                            keep_retriever(out, root / "retrievers" / cell_dir(column, row, seed).relative_to(runs))
                        result["run-config"] = {k: repo_relative(v) for k, v in result["run-config"].items()}
                        result_file(column, row, seed).parent.mkdir(parents=True, exist_ok=True)
                        write_json(result_file(column, row, seed), result, indent=1, sort_keys=False)
                        report()
                    progress.advance(task)
        except KeyboardInterrupt:
            for partial in (root / "partitions").rglob(".*.tmp-*"):  # a partition killed mid-write (atomic_dir's temp)
                shutil.rmtree(partial, ignore_errors=True)
            console.print(
                f"[yellow]interrupted[/]: finished cells are kept in {root / 'cells'}; run the same command "
                "to go on from the cell that was running"
            )
            raise typer.Exit(130) from None
        finally:
            follow_run.stop_local_superlink(env["FLWR_HOME"])
        results = report()
    console.print(summarise(table, results))
    console.print(f"[green]wrote[/] {root / 'table.md'}, {root / 'results.json'}, {root / 'table.png'}")


if __name__ == "__main__":
    typer.run(main)
