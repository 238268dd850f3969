"""Heterogeneous LoRA ranks: a node trains a lower rank than the global adapter, receives a valid adapter of its
rank, and the server adds the weighted mean of the nodes' ΔW updates (reply minus what each was sent) to the global.

Library functions on random factors against exact products; the ClientApp on the real SmolLM2 and a real shard;
the ServerApp's strategy as main() builds it.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.errors import ConfigError
from fedrag_app.federation.lora_aggregation import DEAD_ROW_NORM, refactor, to_client_rank, to_global_rank
from fedrag_app.flower import client_app
from fedrag_app.flower.records import metric_record, numpy_to_record, record_to_numpy
from tests.flower_helpers import RALT, Nodes, checked, client_round, reply

A, B = "lora.m.lora_A.weight", "lora.m.lora_B.weight"
OUT, IN, ALPHA = 6, 5, 16
rng = np.random.default_rng(1)


def adapter(rank: int, *, b_zero: bool = False) -> dict[str, np.ndarray]:
    b = np.zeros((OUT, rank), np.float32) if b_zero else rng.standard_normal((OUT, rank)).astype(np.float32)
    return {A: rng.standard_normal((rank, IN)).astype(np.float32), B: b, "retriever.v": np.ones(3, np.float32)}


def delta(state: dict[str, np.ndarray]) -> np.ndarray:
    """ΔW = (alpha / r) B A, the update the factors stand for."""
    return ALPHA / state[A].shape[0] * state[B].astype(np.float64) @ state[A].astype(np.float64)


def test_padding_to_the_global_rank_keeps_the_update_and_truncation_inverts_it():
    small = adapter(2)
    padded = to_global_rank(small, rank=8)
    assert padded[A].shape == (8, IN) and padded[B].shape == (OUT, 8)
    np.testing.assert_allclose(delta(padded), delta(small), atol=1e-5)
    back = to_client_rank(padded, rank=2, alpha=ALPHA, method="truncate")
    assert all(np.allclose(back[k], small[k], atol=1e-6) for k in small), "shapes and values round-trip"
    with pytest.raises(ValueError, match="at most the global generator.lora-r"):
        to_global_rank(adapter(16), rank=8)


@pytest.mark.parametrize("method", ["truncate", "svd"])
def test_a_lower_rank_client_receives_a_valid_adapter_of_its_rank(method):
    glob = adapter(8)
    local = to_client_rank(glob, rank=3, alpha=ALPHA, method=method)
    assert local[A].shape == (3, IN) and local[B].shape == (OUT, 3)
    if method == "truncate":  # the first three components of the global update, at the client's scale
        first = ALPHA / 8 * glob[B][:, :3].astype(np.float64) @ glob[A][:3].astype(np.float64)
        np.testing.assert_allclose(delta(local), first, atol=1e-5)
    else:  # the best rank-3 approximation of the global update (Eckart-Young)
        u, s, vt = np.linalg.svd(delta(glob))
        np.testing.assert_allclose(delta(local), (u[:, :3] * s[:3]) @ vt[:3], atol=1e-4)


def test_a_zero_update_keeps_every_direction_trainable():
    """Round 1 under stacking: the global B is 0, so ΔW = 0, whose SVD would give A = 0 too and freeze the adapter
    forever: the client keeps the shared random A instead, and a refactored zero direction gets an init-size A row."""
    glob = adapter(8, b_zero=True)
    local = to_client_rank(glob, rank=4, alpha=ALPHA, method="svd")
    assert np.all(local[B] == 0) and np.array_equal(local[A], glob[A][:4])
    b, a, lost = refactor(np.zeros((OUT, IN)), 3, 1.0)
    assert np.all(b == 0) and lost == 0.0
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), DEAD_ROW_NORM, rtol=1e-5)


def _replies(states, weights):
    return [
        reply(RecordDict({"arrays": numpy_to_record(s), "metrics": metric_record({"num-examples": n})}), i + 1)
        for i, (s, n) in enumerate(zip(states, weights))
    ]


@pytest.mark.parametrize("aggregation, method", [("fedavg", "truncate"), ("product", "svd")])
def test_mixed_ranks_2_4_8_keep_the_global_update_in_a_no_op_round_and_add_the_mean_change_in_a_trained_one(
    in_a_server_app, aggregation, method
):
    """Three rounds through the strategy as main() builds it: nodes of ranks 2, 4 and 8 start from what the server
    sends them (to_client_rank) and reply either unchanged (no training) or with a trained change. Averaging whole
    replies kept 0.44 (zero-padding) or 0.84 (stacking) of ΔW's size in a no-op round, shrinking every round."""
    run = {
        "fed.lora-aggregation": aggregation,
        "generator.lora-r": 8,
        "generator.lora-alpha": ALPHA,
        "fed.min-nodes": 3,
    }
    glob = adapter(
        8
    )  # an already trained global adapter: ΔW != 0, of rank 5 (= min(OUT, IN)), so every refactor is exact
    strategy = checked({k: np.zeros_like(v) for k, v in glob.items()}, run)
    ranks, weights = (2, 4, 8), (1.0, 2.0, 3.0)
    for server_round, trains in ((1, False), (2, True), (3, False)):
        list(strategy.configure_train(server_round, numpy_to_record(glob), ConfigRecord({}), Nodes(3)))
        sent = [to_client_rank(glob, rank=r, alpha=ALPHA, method=method) for r in ranks]
        replies = [
            {
                k: v + (0.1 * rng.standard_normal(v.shape).astype(np.float32) if trains and ".lora_" in k else 0)
                for k, v in s.items()
            }
            for s in sent
        ]
        arrays, _ = strategy.aggregate_train(server_round, _replies(replies, weights))
        new = record_to_numpy(arrays)
        assert new[A].shape == (8, IN) and new[B].shape == (OUT, 8)
        change = sum(w / sum(weights) * (delta(r) - delta(s)) for w, r, s in zip(weights, replies, sent))
        if not trains:
            assert np.linalg.norm(delta(new)) == pytest.approx(np.linalg.norm(delta(glob)), rel=1e-5), "ΔW shrank"
        else:
            assert np.linalg.norm(change) > 0.05 * np.linalg.norm(delta(glob)), "the test needs a real change"
        np.testing.assert_allclose(delta(new), delta(glob) + change, atol=1e-4)
        assert strategy.round_costs["lora-svd-energy-lost-max"] == pytest.approx(0.0, abs=1e-10)
        np.testing.assert_array_equal(new["retriever.v"], glob["retriever.v"])
        glob = new


@pytest.mark.parametrize("aggregation, set_by", [("fedavg", "node-config"), ("product", "run-config")])
def test_a_rank_4_node_trains_its_rank_and_the_server_pads_its_reply(node, aggregation, set_by):
    run = {**RALT, "fed.lora-aggregation": aggregation}
    here = {**node, "lora-rank": 4}
    if set_by == "run-config":  # simulation: by partition id (the node fixture is partition 0)
        run, here = {**run, "fed.client-ranks": "4,2,8"}, node
    client_app._MODELS.clear()
    sent, out = client_round(run, here)
    got, glob = record_to_numpy(out.content["arrays"]), record_to_numpy(sent)
    assert sorted(got) == sorted(glob) and out.content["metrics"]["lora-rank"] == 4
    lora_a = [k for k in got if ".lora_A." in k]
    assert lora_a and all(got[k].shape == (4, glob[k].shape[1]) for k in lora_a)
    start = to_client_rank(glob, rank=4, alpha=16, method="svd" if aggregation == "product" else "truncate")
    assert any(not np.array_equal(got[k], start[k]) for k in got if ".lora_B." in k), "the rank-4 adapter trained"
    strategy = checked(glob, run)
    arrays, _ = strategy.aggregate_train(1, [reply(out.content, 1)])
    assert arrays is not None, "the server refused a lower-rank reply"
    merged = record_to_numpy(arrays)
    assert all(merged[k].shape == glob[k].shape for k in glob)
    assert strategy.round_costs["round-bytes-up"] < sum(v.nbytes for v in glob.values()), "rank 4 sends less"


@pytest.mark.parametrize(
    "run, named",
    [
        ({"fed.client-ranks": "4,16"}, "generator.lora-r = 8"),
        ({"fed.client-ranks": "4,x"}, "comma-separated integers"),
        ({"fed.client-ranks": "4,8", "fed.lora-aggregation": "ffa"}, "'ffa'"),
        ({"fed.client-ranks": "4,8", "dp.mode": "local"}, "dp.mode = 'local'"),
    ],
)
def test_rank_options_that_cannot_work_are_refused_by_name(run, named):
    with pytest.raises(ConfigError, match=named):
        AppConfig.from_flat(run)


def test_ranks_go_by_partition_id_and_node_config_wins():
    cfg = AppConfig.from_flat({"fed.client-ranks": "2,4"})
    assert [cfg.node_rank(pid) for pid in range(3)] == [2, 4, 2]
    assert cfg.node_rank(0, 8) == 8 and AppConfig().node_rank(5) == 8
    with pytest.raises(ConfigError, match="node-config key 'lora-rank' = 9"):
        cfg.node_rank(0, 9)


def test_a_node_setup_resolves_configs_rank_and_shard_once_from_the_two_mappings(tmp_path):
    """What every ClientApp handler starts from: the run at the global rank, the node at its own, where its shard is;
    the global adapter it receives is cut to its rank (the truncation, under fed.lora-aggregation = fedavg)."""
    from fedrag_app.federation.exchange import at_node_rank
    from fedrag_app.federation.node_setup import node_setup

    nc = {"partition-id": 1, "data-path": str(tmp_path / "q.jsonl"), "store-path": str(tmp_path / "shard")}
    setup = node_setup({"fed.client-ranks": "2,4"}, nc)
    assert (setup.rank, setup.run.generator.lora_r, setup.store) == (4, 8, {"path": str(tmp_path / "shard")})
    assert node_setup({"fed.client-ranks": "2,4"}, {**nc, "lora-rank": 2}).rank == 2
    glob = adapter(8)
    cut = at_node_rank(glob, setup.run, setup.cfg)
    assert cut[A].shape == (4, IN) and np.array_equal(cut[A], glob[A][:4])
    assert at_node_rank(glob, setup.run, setup.run) is glob
    with pytest.raises(ConfigError, match="train-context-encoder"):
        node_setup({"retriever.train-context-encoder": True}, nc)
