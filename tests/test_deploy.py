"""Deployment across machines, on one machine: real flower-superlink / flower-supernode / flwr processes on
127.0.0.1 with TLS and SuperNode authentication, started only through deploy/fedrag_deploy.py.

Fast tests check the credentials and that the committed Docker Compose files are the ones the tested flag
builders render. Slow tests run fedrag_app itself at the smallest sizes the run-config allows, on tiny
random-initialised models of the real architectures (tests/tiny_models.py: same classes, LoRA targets, trainable
layers and code paths, only narrower) and shards built with the tiny retriever: what they prove is about processes,
TLS, node authentication, Qdrant Edge shards, records, checkpoints and faults, not about the maths, and every
component is the real one (SuperLink, SuperNodes, `flwr run`, Qdrant Edge). Here the happy path with a SuperLink
restart mid-run (and an unregistered node); the SuperNode faults are in tests/test_deploy_faults.py, the runs and
node data both use in tests/deploy_runs.py.
"""

from __future__ import annotations

import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from tests.deploy_helpers import DEPLOY, wait_until
from tests.deploy_runs import (
    checkpoint_rounds,
    make_node_data,
    metric_rounds,
    node_config,
    reply_counts,
    start_federation,
)

sys.path.insert(0, str(DEPLOY))
import compose_files  # noqa: E402
import credentials  # noqa: E402
from flower_commands import SuperLinkSettings, SuperNodeSettings, superlink_argv, supernode_argv  # noqa: E402


# --- fast: credentials and compose files ----------------------------------------------------------------------
def test_tls_certificate_chains_to_ca_and_names_loopback(tmp_path):
    paths = credentials.make_tls(tmp_path, ["superlink.example.org", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    ca.public_key().verify(
        server.signature, server.tbs_certificate_bytes, padding.PKCS1v15(), server.signature_hash_algorithm
    )
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.example.org" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE(paths["server.key"].stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="orphan"):
        credentials.make_tls(tmp_path, ["127.0.0.1"])


def test_node_key_is_openssh_ec_p384_and_private_part_is_0600(tmp_path):
    private, public = credentials.make_node_key(tmp_path, "hospital-a")
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert serialization.load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        credentials.make_node_key(tmp_path, "hospital-a")


def test_compose_files_are_rendered_from_the_tested_flags():
    yaml = pytest.importorskip("yaml")
    for name, text in compose_files.rendered().items():
        committed = (DEPLOY / "compose" / name).read_text()
        assert committed == text, (
            f"deploy/compose/{name} is stale: run python deploy/fedrag_deploy.py compose deploy/compose"
        )
    superlink = yaml.safe_load((DEPLOY / "compose" / "superlink.yml").read_text())["services"]["superlink"]
    supernode = yaml.safe_load((DEPLOY / "compose" / "supernode.yml").read_text())["services"]["supernode"]
    assert superlink["command"] == superlink_argv(compose_files.CONTAINER_SUPERLINK)
    assert supernode["command"] == supernode_argv(compose_files.CONTAINER_SUPERNODE)
    assert superlink["ports"] == ["8000:8000"]
    flags = " ".join(superlink["command"] + supernode["command"])
    for grpc_era in (
        "--fleet-api-address",
        "--control-api-address",
        "--clientappio-api-address",
        "9091",
        "9092",
        "9093",
    ):
        assert grpc_era not in flags
    assert "--insecure" not in flags and "--enable-supernode-auth" in flags
    installed = compose_files.flwr_version()
    assert superlink["build"]["args"]["FLWR_VERSION"] == installed == supernode["build"]["args"]["FLWR_VERSION"]
    help_text = subprocess.run(
        ["flower-superlink", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(Path(sys.executable).parent)},
    ).stdout
    for flag in (f for f in superlink["command"][1:] if f.startswith("--")):
        assert flag in help_text, f"flower-superlink {installed} has no {flag}"


def test_start_commands_exec_the_same_builders_the_compose_files_use(tmp_path):
    def printed(*args: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, str(DEPLOY / "fedrag_deploy.py"), *args, "--print"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        return shlex.split(done.stdout)

    link = printed("superlink", "--tls-dir", "/c", "--database", "/s/state.db", "--host", "0.0.0.0", "--port", "8000")
    assert link == superlink_argv(SuperLinkSettings(tls_dir="/c", database="/s/state.db", host="0.0.0.0", port=8000))
    node = printed(
        "supernode",
        "--superlink",
        "h:8000",
        "--ca-cert",
        "/c/ca.crt",
        "--private-key",
        "/k/a",
        "--node-config",
        "/n/node.toml",
        "--port",
        "9094",
    )
    assert node == supernode_argv(
        SuperNodeSettings(
            superlink="h:8000", ca_cert="/c/ca.crt", private_key="/k/a", node_config_file="/n/node.toml", port=9094
        )
    )


# --- slow: real federations -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def happy_federation(tmp_path_factory, template_shard, tiny_run):
    """SuperLink + 3 registered SuperNodes + 1 unregistered one; a 2-round RA-DIT run whose SuperLink is SIGKILLed
    (its ServerApp with it) after the round-1 checkpoint, restarted on the same database, and resumed for round 2.
    One federation for the happy path and the SuperLink restart: the restart is part of a real run's life."""
    work = tmp_path_factory.mktemp("happy")
    fed = start_federation(work, template_shard, ["a", "b", "c"])
    try:
        node_dir, shard = make_node_data(work, "intruder", 3, template_shard)
        fed.add_node("intruder", node_config(node_dir, partition_id=0, num_partitions=3, shard=shard), register=False)
        out = work / "outputs"
        run = {
            **tiny_run,
            "train.mode": "ra-dit",
            "retriever.train-top-layers": 1,
            "fed.num-server-rounds": 2,
            "fed.min-nodes": 3,
            "fed.round-timeout-s": 300,
            "fed.output-dir": str(out),
        }
        started = time.monotonic()
        first = fed.launch(run)
        # the round-1 row follows the round-1 checkpoint (server_training.RoundRecorder.after_round)
        wait_until(lambda: 1 in metric_rounds(out), timeout_s=300, what="the round-1 checkpoint and metrics row")
        fed.kill("superlink")  # takes its ServerApp subprocess with it
        done_before = checkpoint_rounds(out)
        fed.start_superlink()  # same database: registered keys and runs survive
        fed.wait_online(["a", "b", "c"])
        # Its ServerApp died with the SuperLink: flwr 1.42 marks the run failed on restart; if it still shows
        # running, the operator stops it (deploy/README.md section 7).
        if fed.run_status(first) == "running":
            fed.stop_run(first)
        first_status = fed.run_status(first)
        resumed = fed.launch({**run, "fed.resume": True})
        status = fed.wait_run(resumed, timeout_s=420)
        yield {
            "fed": fed,
            "out": out,
            "first_status": first_status,
            "done_before": done_before,
            "status": status,
            "log": fed.run_log(resumed),
            "seconds": time.monotonic() - started,
        }
    finally:
        fed.close()


@pytest.mark.slow
def test_three_tls_authenticated_supernodes_complete_two_rounds_and_checkpoint(happy_federation):
    """Still proves, on the tiny models: three SuperNodes authenticated by their registered keys reach the SuperLink
    over TLS, each answers both RA-DIT rounds (adapter and retriever travel both ways; round 1 in the first run,
    round 2 in the resumed one), and the ServerApp writes the round-2 checkpoint atomically."""
    h = happy_federation
    assert h["status"] == "finished:completed", h["log"][-4000:]
    assert reply_counts(h["log"]) == [(3, 0)], h["log"][-4000:]
    rows = metric_rounds(h["out"])
    assert sorted(rows) == [1, 2] and all(
        r["round-updates-averaged"] == 3 and r["round-failures"] == 0 for r in rows.values()
    ), rows
    assert checkpoint_rounds(h["out"])[-1] == 2
    assert not list(h["out"].rglob("*.tmp")), "a checkpoint was left half-written"
    print(f"happy path with a SuperLink restart: 2 rounds x 3 nodes in {h['seconds']:.0f} s")


@pytest.mark.slow
def test_unregistered_supernode_cannot_join(happy_federation):
    fed = happy_federation["fed"]
    assert fed.exited("intruder", timeout_s=60) != 0
    assert "Failed to activate SuperNode" in fed.log("intruder")
    assert happy_federation["status"] == "finished:completed"
    assert len(fed.online_node_ids()) == 3 and set(fed.node_ids) == {"a", "b", "c"}


@pytest.mark.slow
def test_superlink_killed_mid_run_resume_continues_from_last_checkpoint(happy_federation):
    """Still proves: the SuperLink SIGKILLed (its ServerApp with it) after the round-1 checkpoint restarts on the
    same database with the registered nodes and the old run intact (it ends finished, not lost); the resumed run
    loads round 1's checkpoint and runs only round 2, ending with the round-2 checkpoint."""
    h = happy_federation
    assert h["done_before"] and h["done_before"][-1] < 2, "the SuperLink was killed after the run ended"
    assert h["first_status"].startswith("finished:")
    assert h["status"] == "finished:completed", h["log"][-4000:]
    assert f"(round {h['done_before'][-1]})" in h["log"], h["log"][-4000:]  # "resuming from <checkpoint> (round 1)"
    assert len(reply_counts(h["log"])) == 2 - h["done_before"][-1], "the resumed run repeated completed rounds"
    assert checkpoint_rounds(h["out"])[-1] == 2
    assert not list(h["out"].rglob("*.tmp"))
