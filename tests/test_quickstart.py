"""`fedrag-app quickstart` (`make run`): its embedded defaults are valid run-config, its paths absolute and under
--out, and, end to end on a tiny configuration, it partitions, evaluates, runs `flwr run .`, asks, summarises and
leaves no Flower process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedrag_app.commands.quickstart import DEFAULTS, app_dir, run_config
from fedrag_app.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_evaluate_once_after_the_last_round(tmp_path):
    flat = run_config({}, tmp_path, None)
    assert flat["fed.server-eval-every"] == flat["fed.num-server-rounds"] == DEFAULTS["fed.num-server-rounds"]
    assert flat["fed.min-nodes"] == flat["partition.num-partitions"] == 3 and flat["train.mode"] == "ra-dit"
    for key in ("partition.dir", "fed.output-dir", "store.path"):
        assert Path(flat[key]).is_absolute() and Path(flat[key]).parent == tmp_path
    more = run_config({"fed.num-server-rounds": 4, "partition.num-partitions": 2}, tmp_path, None)
    assert more["fed.server-eval-every"] == 4 and more["fed.min-nodes"] == 2
    assert more["partition.dir"] != flat["partition.dir"], "other partition settings get their own folder"
    assert app_dir() == REPO


def test_another_retriever_gets_its_own_shards_and_server_store(tmp_path):
    """Shards record their embedding model: a run with another retriever.model must not reuse the default's."""
    flat = run_config({}, tmp_path, None)
    other = run_config({"retriever.model": str(tmp_path / "retriever")}, tmp_path, None)
    assert other["partition.dir"] != flat["partition.dir"] and other["store.path"] != flat["store.path"]


def test_a_bad_override_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="'fed.num-server-round' is unknown"):
        run_config({"fed.num-server-round": 3}, tmp_path, None)


@pytest.mark.slow
def test_quickstart_end_to_end_tiny(tmp_path, data_dir, tiny_models_config):
    """Proves the orchestration end to end (index, partition, evaluation before, `flwr run` with FedAvg over 2 nodes
    averaging both updates, ask with the last checkpoint, summary, no Flower process left) and that --set
    generator.model / retriever.model reach every step (index and partition build shards with that retriever). It
    checks no answer quality, so it runs on tiny random-initialised models of the real architectures
    (tests/tiny_models.py)."""
    out = tmp_path / "qs"
    argv = [
        sys.executable,
        "-m",
        "fedrag_app.cli",
        "quickstart",
        "--out",
        str(out),
        "--rounds",
        "1",
        "--question",
        "who was the first president of the united states",
        *[
            a
            for kv in (
                "partition.num-partitions=2",
                "partition.questions-per-client=4",
                "partition.passages-per-client=40",
                "store.passages-limit=80",
                "train.num-examples=2",
                "ralt.batch-size=2",
                "lsr.batch-size=2",
                "eval.mmlu-limit=2",
                "eval.web-questions-limit=2",
                "ralt.max-seq-len=128",
                "lsr.max-seq-len=128",
                *(f"{k}={v}" for k, v in tiny_models_config.items()),
            )
            for a in ("--set", kv)
        ],
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["mmlu-loglik-n"] == 2 and summary["after"]["round"] == 1
    assert summary["after"]["round-updates-averaged"] == 2 and "wq-f1" in summary["after"]
    assert summary["answer"]["answer"] and summary["answer"]["checkpoint"].endswith("round-0001")
    assert (out / "fed" / "metrics.png").exists() and (out / "fed" / "flower.log").stat().st_size > 0
    for text in ("1 · index", "3 · federated fine-tuning", "5 · summary", "fedrag-app export --checkpoint"):
        assert text in done.stdout
    sys.path.insert(0, str(REPO / "deploy"))
    import follow_run

    assert not follow_run.local_federation_pids(str(out / "flwr_home")), "the local SuperLink was stopped"
