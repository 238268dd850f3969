"""Deployment across machines, on one machine: real flower-superlink / flower-supernode / flwr processes on
127.0.0.1 with TLS and SuperNode authentication, started only through deploy/fedrag_deploy.py.

Fast tests check the credentials and that the committed Docker Compose files are the ones the tested flag
builders render. Slow tests run fedrag_app itself at the smallest sizes the run-config allows, on tiny
random-initialised models of the real architectures (tests/tiny_models.py: same classes, LoRA targets, trainable
layers and code paths, only narrower) and shards built with the tiny retriever: what they prove is about processes,
TLS, node authentication, Qdrant Edge shards, records, checkpoints and faults, not about the maths, and every
component is the real one (SuperLink, SuperNodes, `flwr run`, Qdrant Edge). Two federations in all: the happy path
with a SuperLink restart mid-run (and an unregistered node), and the SuperNode faults (a killed node, then
misconfigured nodes, on one SuperLink).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from tests.deploy_helpers import DEPLOY, REPO, Federation, free_port, wait_until

sys.path.insert(0, str(DEPLOY))
import compose_files  # noqa: E402
import credentials  # noqa: E402
from flower_commands import SuperLinkSettings, SuperNodeSettings, superlink_argv, supernode_argv  # noqa: E402

DATA_DIR = Path(__import__("os").environ["FEDRAG_DATA_DIR"])  # set by conftest.py
QA_PER_NODE = 8
SHARD_PASSAGES = 64

# The smallest run the run-config allows: 1 optimizer step per phase, a few questions, no server-side eval.
# Only what trains travels (RALT: the 1.9 MB adapter), and RA-DIT trains only the query encoder's top layer(s)
# (9-16 MB per reply instead of 93 MB): with three SuperNodes and the SuperLink sharing 2 cores, 3 x 93 MB replies
# kept the SuperLink's SQLite busy past its 5 s busy_timeout ("database is locked", HTTP 500 to the ServerApp,
# which now retries its pulls). Real deployments put the SuperLink on its own machine.
TINY_RUN = {
    "retriever.train-top-layers": 2,
    "runtime.device": "cpu",
    "runtime.num-threads": 1,
    "train.mode": "ralt",
    "train.num-examples": 4,
    "train.max-steps": 1,
    "ralt.batch-size": 2,
    "ralt.top-k": 1,
    "ralt.max-seq-len": 128,
    "lsr.batch-size": 2,
    "lsr.top-k": 2,
    "lsr.max-seq-len": 128,
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


@pytest.fixture(scope="module")
def tiny_run(tiny_models_config) -> dict:
    """TINY_RUN on the tiny models: every process (ServerApp, ClientApps) loads them in milliseconds."""
    return {**TINY_RUN, **tiny_models_config}


@pytest.fixture(scope="module")
def template_shard(tmp_path_factory, tiny_models_config) -> Path:
    """One small shard built with the app's own CLI and the tiny retriever (a shard records its embedding model,
    and the nodes check it); each node gets a copy (one process per shard)."""
    shard = tmp_path_factory.mktemp("shard") / "passages"
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
            f"retriever.model={tiny_models_config['retriever.model']}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return shard


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
        # the round-1 row follows the round-1 checkpoint (server_app.after_round)
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


@pytest.fixture(scope="module")
def fault_federation(tmp_path_factory, template_shard):
    """One SuperLink + SuperNodes a, b, c shared by the SuperNode fault tests, in file order: node c is killed in
    the first; the second adds misconfigured nodes to whoever is still up. Each test checks its own starting set."""
    work = tmp_path_factory.mktemp("faults")
    fed = start_federation(work, template_shard, ["a", "b", "c"])
    try:
        yield fed, work
    finally:
        fed.close()


@pytest.mark.slow
def test_supernode_killed_during_a_round_the_run_goes_on_with_the_others(fault_federation, tiny_run):
    """Still proves: a SuperNode SIGKILLed (with its ClientApp) after it took round 1 costs that round one reply,
    not the run: round 1 is aggregated from the two survivors, round 2 samples only them, and the run completes
    with its round-2 checkpoint."""
    fed, work = fault_federation
    assert fed.online_node_ids() == {fed.node_ids[n] for n in "abc"}, "this test starts from nodes a, b, c only"
    out = work / "outputs-kill"
    # min-nodes 2: the two survivors are enough to sample round 2. The dead node is noticed by its missed
    # heartbeats (36-60 s in flwr 1.42, not configurable) or by the round timeout, whichever comes first.
    run_id = fed.launch({**tiny_run, "fed.min-nodes": 2, "fed.round-timeout-s": 90, "fed.output-dir": str(out)})
    wait_until(lambda: "Start `flwr-clientapp` process" in fed.log("c"), timeout_s=180, what="node c to start round 1")
    fed.kill("c")
    status = fed.wait_run(run_id, timeout_s=300)
    run_log = fed.run_log(run_id)
    assert status == "finished:completed", run_log[-4000:]
    counts = reply_counts(run_log)
    assert counts[0] in ((2, 1), (2, 0)), run_log[-4000:]  # (2, 0): the timeout dropped c's reply uncounted
    assert counts[1] == (2, 0)
    assert checkpoint_rounds(out)[-1] == 2


@pytest.mark.slow
def test_misconfigured_nodes_reply_with_clear_errors_and_the_server_carries_on(
    fault_federation, tiny_run, tiny_models_config, template_shard
):
    """Still proves: three registered SuperNodes that are misconfigured (an int as data-path, an unreachable Qdrant
    URL, a shard of the wrong dimension) each answer with an error reply naming the key, the URL or both
    dimensions, and the ServerApp aggregates the good nodes' updates and checkpoints. It runs on the fault
    federation after the kill test, so the good nodes are whichever of a, b, c are still up (a and b in a full run)."""
    import numpy as np

    from fedrag_app.rag.knowledge_store import KnowledgeStore

    fed, work = fault_federation
    good = [n for n in ("a", "b", "c") if fed.procs[n].poll() is None]
    bad_dir, _ = make_node_data(work, "malformed", 4, template_shard)
    fed.add_node(
        "malformed", {**node_config(bad_dir, partition_id=1, num_partitions=4, shard=bad_dir / "shard"), "data-path": 7}
    )  # an int where a file path belongs

    url_dir, _ = make_node_data(work, "no-qdrant", 5, template_shard)
    dead_url = f"http://127.0.0.1:{free_port()}"
    fed.add_node("no-qdrant", node_config(url_dir, partition_id=2, num_partitions=4, store_url=dead_url))

    dim_dir, _ = make_node_data(work, "wrong-dim", 6, template_shard)
    wrong_shard = dim_dir / "shard-dim8"
    retriever = tiny_models_config["retriever.model"]  # the shard names the nodes' retriever: only its dimension is off
    with KnowledgeStore.create(path=str(wrong_shard), embedding_model=retriever, dim=8) as store:
        store.add(["p0"], np.ones((1, 8), dtype=np.float32), ["t"], ["x"])
        store.finalize()  # a complete shard, only of the wrong dimension
    fed.add_node("wrong-dim", node_config(dim_dir, partition_id=3, num_partitions=4, shard=wrong_shard))

    nodes = good + ["malformed", "no-qdrant", "wrong-dim"]
    want = {fed.node_ids[n] for n in nodes}
    # exactly these: a killed node must have been noticed offline, or it would be sampled and counted
    wait_until(lambda: fed.online_node_ids() == want, timeout_s=90, what=f"exactly {nodes} online", poll_s=2)
    out = work / "outputs-misconfigured"
    run_id = fed.launch(
        {
            **tiny_run,
            "fed.num-server-rounds": 1,
            "fed.min-nodes": len(nodes),
            "fed.round-timeout-s": 300,
            "fed.output-dir": str(out),
        }
    )
    status = fed.wait_run(run_id, timeout_s=300)
    run_log = fed.run_log(run_id)
    assert status == "finished:completed", run_log[-4000:]
    assert reply_counts(run_log) == [(len(good), 3)], run_log[-4000:]
    errors = re.findall(r"Received error in reply from node \d+: (.*)", run_log)
    assert len(errors) == 3, run_log[-4000:]
    assert any("data-path" in e for e in errors), errors  # the malformed key is named
    assert any(dead_url in e for e in errors), errors  # the unreachable Qdrant URL is named
    assert any("8-d" in e and "32-d" in e for e in errors), errors  # both dimensions of the mismatch
    assert checkpoint_rounds(out)[-1] == 1


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
