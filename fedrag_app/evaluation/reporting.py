"""Per-round metrics as JSONL (one object per round) and a PNG plot of losses and scores."""

from __future__ import annotations

import json
from pathlib import Path

from fedrag_app.core.atomic import atomic_path, write_text

PANELS = {  # one panel per scale: a loss, Web Questions scores, retrieval, MMLU accuracy
    "training loss (client mean)": ("ralt-loss-mean", "lsr-loss-mean"),
    "Web Questions (server)": ("wq-f1", "wq-em"),
    "answer retrieval (server)": ("retrieval-recall@10", "retrieval-mrr@10"),
    "MMLU (server)": (
        "mmlu-loglik-accuracy",  # carries the model's favourite letter (evaluation/mmlu.py)
        "mmlu-circular-accuracy",  # does not
        "mmlu-cloze-accuracy",
    ),
}


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(path: str | Path, row: dict) -> list[dict]:
    """Add (or replace, on a resumed round) the row for row['round']; the file is rewritten atomically."""
    rows = [r for r in read_metrics(path) if r.get("round") != row["round"]] + [row]
    rows.sort(key=lambda r: r["round"])
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows


def dp_label(key: str, rows: list[dict]) -> str:
    """A plotted key's legend label: marked when a row names it (or its "train-" form) among the values nodes sent
    un-noised under DP (dp-unprotected)."""
    unprotected = {k.removeprefix("train-") for r in rows for k in r.get("dp-unprotected", [])}
    return f"{key} (not DP-protected)" if key in unprotected else key


def plot_metrics(rows: list[dict], png_path: str | Path) -> None:
    """metrics_figure(rows) as a PNG, written atomically."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(rows)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def metrics_figure(rows: list[dict]):
    """One panel per scale (PANELS), rounds on an integer axis from round 0 when the run evaluated the initial model
    (fed.server-eval-round-0). Under DP (a row's dp-mode) the title says so, and a curve whose values nodes sent
    un-noised (the row's dp-unprotected keys) is labelled "not DP-protected"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.6))
    dp_mode = next((r["dp-mode"] for r in reversed(rows) if "dp-mode" in r), None)
    for axis, (title, keys) in zip(axes, PANELS.items()):
        for key in keys:
            # the federated server prefixes client training metrics with "train-"; the centralized run does not
            points = [(r["round"], r.get(key, r.get(f"train-{key}"))) for r in rows if key in r or f"train-{key}" in r]
            if points:
                axis.plot(*zip(*points), marker="o", label=dp_label(key, rows))
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axis.lines:
            axis.legend(fontsize=7)
    if dp_mode:
        fig.suptitle(f"dp.mode = {dp_mode}: DP-protected unless marked (server evaluation: of DP-protected weights)")
    fig.tight_layout()
    return fig
