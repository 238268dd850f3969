"""End to end in Flower's simulation: `fedrag-app partition`, then `flwr run .` with 2 clients and 2 rounds of
RA-DIT with FFA-LoRA under client-side-clipping DP (Flower's mod + wrapper + RDP accountant).

One run instead of the former two (plain RA-DIT FedAvg, and RALT + FFA + client-clip DP): RA-DIT exchanges both
the adapter and the retriever, so this run still crosses every process boundary both did, and adds the DP and FFA
checks. FedAvg without DP through `flwr run` stays proven by tests/test_quickstart.py's end-to-end run (RA-DIT,
FedAvg, every update averaged); the FedAvg and DP maths by tests/test_privacy.py and tests/test_flower_app.py on the
real models. This is plumbing, so it runs on tiny random-initialised models of the real architectures
(tests/tiny_models.py): the same classes, LoRA targets and records, milliseconds per step.

Own FLWR_HOME and ports (follow_run.local_flwr_env), success read from `flwr ls --format json` (flwr run exits 0 on
failure) and from the checkpoints on disk; the background local SuperLink is killed by PID.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.deploy_helpers import DEPLOY, REPO, VENV_BIN
from tests.flower_helpers import rdp_epsilon

sys.path.insert(0, str(DEPLOY))
import follow_run  # noqa: E402

PRIVATE = [
    "fed.lora-aggregation='ffa'",
    "dp.mode='client-clip'",
    "dp.clipping-norm=0.05",
    "dp.noise-multiplier=0.8",
    "dp.delta=0.00001",
]


def _rows(out, n: int):
    """True once the run wrote its n-th metrics row (then it only saves the plot and stops)."""
    path = out / "metrics.jsonl"
    return lambda: path.exists() and len(path.read_text().splitlines()) >= n


def _bytes_per_reply(tiny: dict[str, str], run_config: list[str]) -> tuple[int, int]:
    """What one node's reply carries under this run's config (FFA: B factors + retriever), and what it would carry
    under FedAvg (A and B + retriever): computed in this process on the same tiny models."""
    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.config.values import parse_override
    from fedrag_app.federation.exchange import exchanged_weights
    from fedrag_app.flower.records import pack_weights
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.retriever import load_retriever

    flat = {
        **dict(parse_override(item) for item in run_config if not item.startswith(("partition.", "fed.output"))),
        **tiny,
    }
    cfg = AppConfig.from_flat(flat)
    gen, retriever = load_generator(cfg.generator), load_retriever(cfg.retriever)
    fedavg = AppConfig.from_flat({**flat, "fed.lora-aggregation": "fedavg"})
    return tuple(pack_weights(*exchanged_weights(c, gen, retriever)).count_bytes() for c in (cfg, fedavg))


@pytest.mark.slow
def test_partition_then_flwr_run_two_clients_two_rounds(tmp_path, data_dir, tiny_models_config):
    """Proves, through real processes (CLI, local SuperLink, simulation with 2 SuperNodes): partition builds shards
    the nodes open; both rounds receive 2 results, drop nothing and average both updates; adapter, retriever and
    state are checkpointed each round and the plot written; client and server evaluation metrics arrive; Flower's
    client-side DP mod + server wrapper add noise and the accountant's epsilon per round equals dp-accounting's;
    FFA-LoRA replies carry exactly the B factors and the retriever (fewer bytes than FedAvg's A and B); and no
    Flower process outlives the test."""
    env = follow_run.local_flwr_env(tmp_path / "flwr_home", bin_dir=VENV_BIN)
    tiny = [f"{k}='{v}'" for k, v in tiny_models_config.items()]
    parts, out = tmp_path / "parts", tmp_path / "outputs"
    done = subprocess.run(
        [
            str(VENV_BIN / "fedrag-app"),
            "partition",
            "-n",
            "2",
            "--out",
            str(parts),
            "--set",
            "partition.questions-per-client=6",
            "--set",
            "partition.passages-per-client=60",
            "--set",
            f"retriever.model={tiny_models_config['retriever.model']}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_config = [
        f"partition.dir='{parts}'",
        f"fed.output-dir='{out}'",
        "fed.num-server-rounds=2",
        "fed.min-nodes=2",
        "fed.server-eval=true",
        "eval.mmlu-limit=2",
        "eval.web-questions-limit=2",
        "eval.batch-size=2",
        "runtime.num-threads=1",
        "train.mode='ra-dit'",
        "train.num-examples=4",
        "train.max-steps=1",
        "ralt.batch-size=2",
        "ralt.top-k=1",
        "ralt.max-seq-len=128",
        "lsr.batch-size=2",
        "lsr.top-k=2",
        "lsr.max-seq-len=128",
        "retriever.train-top-layers=1",
        "store.passages-limit=64",
        *PRIVATE,
        *tiny,
    ]
    try:
        run_id = follow_run.launch_run(
            str(REPO), "local", run_config, flwr=str(VENV_BIN / "flwr"), timeout_s=180, env=env
        )
        status = follow_run.wait_for_run(
            "local", run_id, timeout_s=600, poll_s=15, flwr=str(VENV_BIN / "flwr"), env=env, soon=_rows(out, 2)
        )
        log = subprocess.run(
            [str(VENV_BIN / "flwr"), "log", str(run_id), "local", "--show"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        ).stdout
        assert status == "finished:completed", log[-4000:]
        assert log.count("Received 2 results and 0 failures") >= 2, log[-4000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["round-bytes-up"] > 0 and r["round-train-seconds"] >= r["round-local-seconds-max"] for r in rows)
        assert all(r["round-failures"] == 0 and r["round-updates-averaged"] == 2 for r in rows)
        assert "mmlu-loglik-accuracy" in rows[-1] and "client-wq-f1" in rows[-1]
        for n in (1, 2):
            ckpt = out / f"round-{n:04d}"
            assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
            assert (ckpt / "retriever" / "query" / "model.safetensors").exists()
            assert json.loads((ckpt / "state.json").read_text())["round"] == n
        assert (out / "metrics.png").stat().st_size > 0
        assert "dropped the update" not in log, log[-4000:]
        assert "central DP noise with" in log and "Privacy spent" in log, log[-4000:]
        assert [r["dp-epsilon"] for r in rows] == pytest.approx([rdp_epsilon(0.8, rounds, 1e-5) for rounds in (1, 2)])
        ffa, fedavg = _bytes_per_reply(tiny_models_config, run_config)
        assert [r["round-bytes-up"] for r in rows] == [2 * ffa, 2 * ffa], "FFA-LoRA: B factors + retriever only"
        assert ffa < fedavg
    finally:
        follow_run.stop_local_superlink(env["FLWR_HOME"])
        assert not follow_run.local_federation_pids(env["FLWR_HOME"])
