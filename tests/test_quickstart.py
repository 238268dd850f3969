"""`fedrag-app quickstart` (`make run`): its embedded defaults are valid run-config, its paths absolute and under
--out, and, end to end on a tiny configuration, it partitions, evaluates, runs `flwr run .` (two rounds under
client-side DP and FFA-LoRA), asks, summarises and leaves no Flower process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedrag_app.commands.quickstart import DEFAULTS, app_dir, run_config
from fedrag_app.config.values import toml_value
from fedrag_app.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_evaluate_once_after_the_last_round(tmp_path):
    flat = run_config({}, tmp_path, None)
    assert flat["fed.server-eval-every"] == flat["fed.num-server-rounds"] == DEFAULTS["fed.num-server-rounds"]
    assert flat["fed.min-nodes"] == flat["partition.num-partitions"] == 3 and flat["train.mode"] == "ralt"
    assert flat["fed.strategy"] == "fedavgm" and flat["fed.server-eval-round-0"] is True, "quality_full's setting"
    for key in ("partition.dir", "fed.output-dir", "store.path"):
        assert Path(flat[key]).is_absolute() and Path(flat[key]).parent == tmp_path
    plain = run_config({"fed.strategy": "fedavg"}, tmp_path, None)
    assert "fed.server-learning-rate" not in plain and "fed.server-momentum" not in plain, "FedAvgM's keys dropped"
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


# Flower's client-side DP (mod + server wrapper + RDP accountant) under FFA-LoRA: the run below adds these, so the
# one `flwr run` simulation of the suite crosses every process boundary with the private aggregation path too.
# FedAvg without DP through `flwr run` is proven by tests/test_deploy.py's federations (real SuperLink, SuperNodes).
PRIVATE = {
    "fed.strategy": "fedavg",  # central DP noises FedAvg's mean; a server optimizer would rescale it (a ConfigError)
    "fed.lora-aggregation": "ffa",
    "dp.mode": "client-clip",
    "dp.clipping-norm": 0.05,
    "dp.noise-multiplier": 0.8,
    "dp.delta": 1e-5,
}
TINY_RUN = {
    "partition.num-partitions": 2,
    "partition.questions-per-client": 4,
    "partition.passages-per-client": 40,
    "store.passages-limit": 80,
    "train.num-examples": 4,
    "train.max-steps": 1,
    "ralt.batch-size": 2,
    "lsr.batch-size": 2,
    "ralt.max-seq-len": 128,
    "lsr.max-seq-len": 128,
    "retriever.train-top-layers": 1,
    "eval.mmlu-limit": 2,
    "eval.web-questions-limit": 2,
    "eval.batch-size": 2,
    "runtime.num-threads": 1,
}


def _bytes_per_reply(flat: dict) -> tuple[int, int]:
    """What one node's reply carries under this run's config (FFA: B factors + retriever), and what it would carry
    under FedAvg (A and B + retriever): computed in this process on the same tiny models."""
    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.federation.exchange import outgoing_state
    from fedrag_app.flower.records import numpy_to_record
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.retriever import load_retriever

    cfg = AppConfig.from_flat(flat)
    gen, retriever = load_generator(cfg.generator), load_retriever(cfg.retriever)
    fedavg = AppConfig.from_flat({**flat, "fed.lora-aggregation": "fedavg"})
    return tuple(numpy_to_record(outgoing_state(c, gen, retriever)).count_bytes() for c in (cfg, fedavg))


@pytest.mark.slow
def test_quickstart_end_to_end_tiny_two_private_rounds(tmp_path, data_dir, tiny_models_config):
    """The suite's one `flwr run` training simulation (it absorbed the former tests/test_flwr_run.py). Proves the
    orchestration end to end through real processes (CLI, `fedrag-app partition`, local SuperLink, simulation with 2
    SuperNodes): the server's evaluation before (round 0) and after, paired in the summary; both rounds receive 2
    results, drop nothing and average both updates; adapter,
    retriever and state are checkpointed each round, the plot and the Flower log written; server evaluation metrics
    arrive while under DP the nodes withhold their losses, timings and scores (the rows say so); Flower's client-side DP
    mod + server wrapper add noise and the accountant's epsilon per round equals dp-accounting's; FFA-LoRA replies carry
    exactly the B factors and the retriever (fewer bytes than FedAvg's A and B); ask answers with the last checkpoint;
    the summary is written; --set generator.model / retriever.model reach every step (index and partition build shards
    with that retriever); and no Flower process outlives the run. It checks no answer quality, so it runs on tiny
    random-initialised models of the real architectures (tests/tiny_models.py)."""
    from tests.flower_helpers import rdp_epsilon

    out = tmp_path / "qs"
    overrides = {**TINY_RUN, **PRIVATE, **tiny_models_config}
    argv = [
        sys.executable,
        "-m",
        "fedrag_app.cli",
        "quickstart",
        "--out",
        str(out),
        "--rounds",
        "2",
        "--question",
        "who was the first president of the united states",
        *[a for k, v in overrides.items() for a in ("--set", f"{k}={toml_value(v, k)}")],
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["round"] == 0 and summary["before"]["mmlu-loglik-n"] == 2
    assert summary["after"]["round"] == 2
    assert summary["paired"]["wq-f1"]["n"] == 2 and "low" in summary["paired"]["wq-f1"], "round 2 against round 0"
    assert summary["answer"]["answer"] and summary["answer"]["checkpoint"].endswith("round-0002")
    for text in ("1 · index", "2 · federated fine-tuning", "4 · summary", "Web Questions F1", "fedrag-app export"):
        assert text in done.stdout
    fed = out / "fed"
    log = (fed / "flower.log").read_text()
    assert log.count("Received 2 results and 0 failures") >= 2, log[-4000:]
    assert "dropped the update" not in log, log[-4000:]
    assert "central DP noise with" in log and "Privacy spent" in log, log[-4000:]
    rows = [json.loads(line) for line in (fed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and (fed / "predictions" / "round-0.jsonl").exists()
    assert "wq-f1" in rows[0] and "round-bytes-up" not in rows[0], "round 0: the initial model's evaluation alone"
    rows = rows[1:]
    assert all(r["round-bytes-up"] > 0 and r["round-train-seconds"] > 0 for r in rows)
    assert all(r["round-failures"] == 0 and r["round-updates-averaged"] == 2 for r in rows)
    assert "mmlu-loglik-accuracy" in rows[-1] and "wq-f1" in summary["after"]
    # under DP the nodes (simulated: no dp-share-metrics) withhold what they computed on their data: no losses,
    # timings or held-out scores in the row, which says what is protected
    assert all(r["dp-protected"] is True and r["dp-unprotected"] == [] and r["dp-mode"] == "client-clip" for r in rows)
    assert not [k for r in rows for k in r if k.startswith(("train-ralt-", "client-wq-", "round-local-seconds"))]
    for n in (1, 2):
        ckpt = fed / f"round-{n:04d}"
        assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
        assert (ckpt / "retriever" / "query" / "model.safetensors").exists()
        assert json.loads((ckpt / "state.json").read_text())["round"] == n
    assert (fed / "metrics.png").stat().st_size > 0
    assert [r["dp-epsilon"] for r in rows] == pytest.approx([rdp_epsilon(0.8, rounds, 1e-5) for rounds in (1, 2)])
    ffa, fedavg = _bytes_per_reply(run_config({**overrides, "fed.num-server-rounds": 2}, out, None))
    assert [r["round-bytes-up"] for r in rows] == [2 * ffa, 2 * ffa], "FFA-LoRA: B factors + retriever only"
    assert ffa < fedavg
    from fedrag_app.federation import follow_run

    assert not follow_run.local_federation_pids(str(out / "flwr_home")), "the local SuperLink was stopped"
