"""Per-round metrics as JSONL (one object per round) and a PNG plot of losses and scores."""

from __future__ import annotations

import json
from pathlib import Path

from fedrag_app.core.atomic import atomic_path, write_text

PLOTTED = (
    "ralt-loss-mean",
    "lsr-loss-mean",
    "mmlu-loglik-accuracy",  # carries the model's favourite letter (evaluation/mmlu.py)
    "mmlu-circular-accuracy",  # does not
    "mmlu-cloze-accuracy",
    "wq-f1",
    "wq-em",
    "retrieval-recall@10",
    "client-wq-f1",
)


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
    """Losses (left) and evaluation scores (right) per round. Under DP (a row's dp-mode) the title says so, and a
    curve whose values nodes sent un-noised (the row's dp-unprotected keys) is labelled "not DP-protected"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (losses, scores) = plt.subplots(1, 2, figsize=(11, 4))
    dp_mode = next((r["dp-mode"] for r in reversed(rows) if "dp-mode" in r), None)
    for key in PLOTTED:
        # the federated server prefixes client training metrics with "train-"; the centralized run does not
        points = [(r["round"], r.get(key, r.get(f"train-{key}"))) for r in rows if key in r or f"train-{key}" in r]
        if points:
            axis = losses if "loss" in key else scores
            axis.plot(*zip(*points), marker="o", label=dp_label(key, rows))
    for axis, title in ((losses, "training loss (client mean)"), (scores, "evaluation")):
        axis.set_title(title)
        axis.set_xlabel("round")
        if axis.lines:
            axis.legend(fontsize=8)
    if dp_mode:
        fig.suptitle(f"dp.mode = {dp_mode}: DP-protected unless marked (server evaluation: of DP-protected weights)")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
