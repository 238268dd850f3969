"""The federations tests/test_deploy.py and tests/test_deploy_faults.py run: the smallest run-config, the data
layout an institution provides, and what a run left behind (checkpoints, metrics rows, reply counts).

Two files, so pytest-xdist runs the happy-path federation and the fault federation on two workers at once: each is
minutes of waiting on Flower processes (heartbeats, round timeouts), not of computing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy_helpers import REPO, Federation
from tests.flower_helpers import TINY

DATA_DIR = Path(os.environ["FEDRAG_DATA_DIR"])  # set by conftest.py
QA_PER_NODE = 8
SHARD_PASSAGES = 64

# The smallest run the run-config allows: 1 optimizer step per phase, a few questions, no server-side eval.
# Only what trains travels (RALT: the 1.9 MB adapter), and RA-DIT trains only the query encoder's top layer(s)
# (9-16 MB per reply instead of 93 MB): with three SuperNodes and the SuperLink sharing 2 cores, 3 x 93 MB replies
# kept the SuperLink's SQLite busy past its 5 s busy_timeout ("database is locked", HTTP 500 to the ServerApp,
# which now retries its pulls). Real deployments put the SuperLink on its own machine.
TINY_RUN = {
    **TINY,  # the ClientApp unit tests' smallest training step (tests/flower_helpers.py)
    "retriever.train-top-layers": 2,
    "runtime.device": "cpu",
    "runtime.num-threads": 1,
    "train.mode": "ralt",
    "store.passages-limit": SHARD_PASSAGES,
    "eval.web-questions-limit": 4,
    "eval.mmlu-limit": 4,
    "fed.fraction-evaluate": 0.0,
    "fed.server-eval": False,
    "fed.num-server-rounds": 2,
}


# --- node data: the layout an institution provides (deploy/README.md) ------------------------------------------
def node_config(
    node_dir: Path, *, partition_id: int, num_partitions: int, shard: Path | None = None, store_url: str = ""
) -> dict:
    """The node.toml keys fedrag_app's ClientApp reads on a real SuperNode (docs/FEDERATION.md)."""
    cfg = {"partition-id": partition_id, "num-partitions": num_partitions, "data-path": str(node_dir / "train.jsonl")}
    if store_url:
        cfg["store-url"] = store_url
    else:
        cfg["store-path"] = str(shard)
    return cfg


def make_node_data(work: Path, name: str, index: int, template_shard: Path) -> tuple[Path, Path]:
    """An institution's folder: its questions (a slice of Web Questions train) and its own shard copy."""
    node_dir = work / "data" / name
    node_dir.mkdir(parents=True)
    lines = (DATA_DIR / "web_questions" / "train.jsonl").read_text().splitlines()
    (node_dir / "train.jsonl").write_text("\n".join(lines[index * QA_PER_NODE : (index + 1) * QA_PER_NODE]) + "\n")
    shard = node_dir / "shard"
    shutil.copytree(template_shard, shard)
    return node_dir, shard


def start_federation(work: Path, template_shard: Path, names: list[str]) -> Federation:
    fed = Federation(work)
    fed.create_credentials()
    fed.start_superlink()
    for i, name in enumerate(names):
        node_dir, shard = make_node_data(work, name, i, template_shard)
        fed.add_node(name, node_config(node_dir, partition_id=i, num_partitions=len(names), shard=shard))
    fed.wait_online(names)
    return fed


def checkpoint_rounds(out_dir: Path) -> list[int]:
    """Rounds with a complete checkpoint under fed.output-dir (a state.json naming its round; temp folders skipped)."""
    rounds = []
    for state in out_dir.rglob("state.json"):
        if any(part.endswith(".tmp") or part.startswith(".") for part in state.relative_to(out_dir).parts):
            continue
        try:
            doc = json.loads(state.read_text())
        except (json.JSONDecodeError, FileNotFoundError):
            continue
        for key in ("round", "server-round", "server_round", "last_round"):
            if isinstance(doc.get(key), int):
                rounds.append(doc[key])
    return sorted(set(rounds))


def metric_rounds(out_dir: Path) -> dict[int, dict]:
    """The ServerApp's metrics.jsonl rows by round (written atomically after each round's checkpoint)."""
    from fedrag_app.evaluation.reporting import read_metrics

    return {r["round"]: r for r in read_metrics(out_dir / "metrics.jsonl")}


def reply_counts(run_log: str) -> list[tuple[int, int]]:
    """(results, failures) per round from the ServerApp log (`aggregate_train: Received N results and M failures`)."""
    return [(int(a), int(b)) for a, b in re.findall(r"Received (\d+) results and (\d+) failures", run_log)]


def build_template_shard(shard: Path, retriever_model: str) -> Path:
    """Index the first SHARD_PASSAGES passages into `shard` with the app's own CLI and the given retriever."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedrag_app.cli",
            "index",
            str(DATA_DIR / "wikipedia"),
            "--limit",
            str(SHARD_PASSAGES),
            "--store",
            str(shard),
            "--set",
            f"retriever.model={retriever_model}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return shard
