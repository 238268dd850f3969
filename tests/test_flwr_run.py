"""End to end in Flower's simulation: `fedrag-app partition`, then `flwr run .` with 2 clients and 2 rounds: plain
RA-DIT FedAvg, and RALT with FFA-LoRA under client-side-clipping DP (Flower's mod + wrapper + RDP accountant).

Own FLWR_HOME and ports, runtime dependency install off, success read from `flwr ls --format json` (flwr run
exits 0 on failure) and from the checkpoints on disk; the background local SuperLink is killed by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.deploy_helpers import DEPLOY, REPO, VENV_BIN, free_port

sys.path.insert(0, str(DEPLOY))
import follow_run  # noqa: E402

PRIVATE = [
    "train.mode='ralt'",
    "fed.lora-aggregation='ffa'",
    "dp.mode='client-clip'",
    "dp.clipping-norm=0.05",
    "dp.noise-multiplier=0.8",
    "dp.delta=0.00001",
]


def rdp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Google's dp-accounting directly: `rounds` Gaussian releases of this noise multiplier, epsilon at delta."""
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [[], PRIVATE], ids=["ra-dit-fedavg", "ralt-ffa-client-clip-dp"])
def test_partition_then_flwr_run_two_clients_two_rounds(tmp_path, data_dir, variant):
    env = dict(
        os.environ,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        FLWR_HOME=str(tmp_path / "flwr_home"),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
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
    ]
    overridden = {item.split("=")[0] for item in variant}
    run_config = [item for item in run_config if item.split("=")[0] not in overridden] + variant
    try:
        run_id = follow_run.launch_run(
            str(REPO), "local", run_config, flwr=str(VENV_BIN / "flwr"), timeout_s=180, env=env
        )
        status = follow_run.wait_for_run("local", run_id, timeout_s=900, flwr=str(VENV_BIN / "flwr"), env=env)
        log = subprocess.run(
            [str(VENV_BIN / "flwr"), "log", str(run_id), "local", "--show"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        ).stdout
        assert status == "finished:completed", log[-4000:]
        assert "Received 2 results and 0 failures" in log, log[-4000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["round-bytes-up"] > 0 and r["round-train-seconds"] >= r["round-local-seconds-max"] for r in rows)
        assert all(r["round-failures"] == 0 and r["round-updates-averaged"] == 2 for r in rows)
        assert "mmlu-loglik-accuracy" in rows[-1] and "client-wq-f1" in rows[-1]
        final = out / "round-0002"
        assert (final / "adapter" / "adapter_model.safetensors").exists()
        assert (final / "retriever" / "query" / "model.safetensors").exists()
        assert json.loads((final / "state.json").read_text())["round"] == 2
        assert (out / "metrics.png").stat().st_size > 0
        assert "dropped the update" not in log, log[-4000:]
        if variant:
            assert "central DP noise with" in log and "Privacy spent" in log, log[-4000:]
            assert [r["dp-epsilon"] for r in rows] == pytest.approx(
                [rdp_epsilon(0.8, rounds, 1e-5) for rounds in (1, 2)]
            )
            assert rows[-1]["round-bytes-up"] / 2 < 0.5 * 1.87e6, (
                "FFA-LoRA sends only the B factors (< half the adapter)"
            )
    finally:
        follow_run.stop_local_superlink(env["FLWR_HOME"])
        assert not follow_run.local_federation_pids(env["FLWR_HOME"])
