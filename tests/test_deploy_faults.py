"""SuperNode faults on a real federation (flower-superlink / flower-supernode / flwr processes on 127.0.0.1, TLS,
SuperNode authentication, started through deploy/fedrag_deploy.py): a SuperNode killed mid-round, then
misconfigured nodes, on one SuperLink. Tiny random-initialised models of the real architectures, as in
tests/test_deploy.py, whose happy-path federation runs beside this one on another pytest-xdist worker.
"""

from __future__ import annotations

import re

import pytest

from tests.deploy_helpers import free_port, wait_until
from tests.deploy_runs import checkpoint_rounds, make_node_data, node_config, reply_counts, start_federation


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
    wait_until(lambda: fed.online_node_ids() == want, timeout_s=90, what=f"exactly {nodes} online", poll_s=4)
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
