"""fed.strategy's robust strategies (Flower's FedMedian, FedTrimmedAvg, Krum, MultiKrum) and fed.update-norm-bound:
the maths against numpy written here, Krum's ranking where float32 cannot tell nodes apart, the bound with other
strategies, and the combinations refused by name. The malicious-node fault test is test_malicious_institution.py."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.serverapp.strategy.multikrum import compute_distances

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.errors import ConfigError
from fedrag_app.federation.robust import bound_update_norms, update_norms
from fedrag_app.flower.records import metric_record, numpy_to_record, record_to_numpy
from fedrag_app.flower.strategies import build_strategy
from tests.flower_helpers import Nodes, reply

REFERENCE = {"lora.w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "retriever.v": np.ones(5, np.float16)}
WEIGHTS = (1, 2, 5, 3, 4)  # num-examples of the five nodes; node 5 is the malicious one


def _states(x: dict, seed: int = 0, attack: float = 1000.0) -> list[dict]:
    """Five replies around ``x``: four honest updates, the fifth ``attack`` x an honest one."""
    rng = np.random.default_rng(seed)
    states = []
    for i in range(5):
        update = {k: rng.normal(0, 0.01, v.shape) for k, v in x.items()}
        scale = attack if i == 4 else 1.0
        states.append({k: (x[k] + scale * update[k]).astype(x[k].dtype) for k in x})
    return states


def _aggregate(run: dict, states: list[dict], x: dict = REFERENCE):
    """One round of the strategy the ServerApp builds: configure with ``x``, aggregate the replies."""
    strategy = build_strategy(AppConfig.from_flat({"fed.min-nodes": 5, **run}), x, None)
    list(strategy.configure_train(1, numpy_to_record(x), ConfigRecord({}), Nodes(5)))
    replies = [
        reply(RecordDict({"arrays": numpy_to_record(s), "metrics": metric_record({"num-examples": n})}), i + 1)
        for i, (s, n) in enumerate(zip(states, WEIGHTS))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, record_to_numpy(arrays)


def _krum_scores(states: list[dict], f: int) -> np.ndarray:
    """Krum's score of each node: the sum of squared distances to its n - f - 2 nearest others, in float64."""
    flat = np.stack([np.concatenate([s[k].astype(np.float64).ravel() for k in sorted(s)]) for s in states])
    d = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)  # (n, n)
    return np.array([np.sort(np.delete(row, i))[: len(states) - f - 2].sum() for i, row in enumerate(d)])


# --- the update-norm bound (federation/robust.py) ----------------------------------------------------------------
def test_the_norm_bound_clips_an_update_to_a_multiple_of_the_median_norm_and_keeps_its_direction():
    sent = {"a": np.zeros(3, np.float32), "b": np.ones(2, np.float16)}
    unit = np.array([1.0, 2.0, 2.0, 0.0, 0.0]) / 3.0  # over a's 3 and b's 2 weights: norm 1
    states = [
        {"a": (n * unit[:3]).astype(np.float32), "b": (1.0 + n * unit[3:]).astype(np.float16)}
        for n in (1.0, 2.0, 3.0, 4.0, 1000.0)
    ]
    bounded, norms, stats = bound_update_norms(states, sent, 2.0)
    np.testing.assert_allclose(norms, [1, 2, 3, 4, 1000], rtol=1e-3)
    assert stats == pytest.approx(
        {"update-norm-median": 3.0, "update-norm-max": 1000.0, "update-norm-bound": 6.0, "updates-clipped": 1.0},
        rel=1e-3,
    )
    assert all(b is s for b, s in zip(bounded[:4], states[:4])), "updates within the bound are passed on untouched"
    np.testing.assert_allclose(bounded[4]["a"], 6.0 * unit[:3], rtol=1e-3)  # 2 x median 3, same direction
    assert bounded[4]["a"].dtype == np.float32 and bounded[4]["b"].dtype == np.float16
    np.testing.assert_allclose(update_norms(bounded, sent), [1, 2, 3, 4, 6], rtol=1e-3)


def test_a_round_where_the_median_node_did_not_move_sets_an_outlier_back_to_the_global_weights():
    sent = {"a": np.full(4, 0.5, np.float32)}
    states = [dict(sent), dict(sent), dict(sent), {"a": np.full(4, 9.0, np.float32)}]
    bounded, _, stats = bound_update_norms(states, sent, 3.0)
    assert stats["update-norm-bound"] == 0.0 and stats["updates-clipped"] == 1.0
    np.testing.assert_array_equal(bounded[3]["a"], sent["a"])


# --- Flower's robust strategies, as build_strategy wires them ----------------------------------------------------
@pytest.mark.parametrize(
    "name, cls", [("fedmedian", FedMedian), ("fedtrimmedavg", FedTrimmedAvg), ("krum", Krum), ("multikrum", MultiKrum)]
)
def test_each_robust_strategy_is_flowers_own_and_matches_numpy(in_a_server_app, name, cls):
    states = _states(REFERENCE)
    strategy, got = _aggregate({"fed.strategy": name}, states)
    assert isinstance(strategy.aggregator, cls)
    stack = {k: np.stack([s[k].astype(np.float64) for s in states]) for k in REFERENCE}  # (5, ...)
    scores = _krum_scores(states, f=1)
    if name == "fedmedian":
        expected = {k: np.median(v, axis=0) for k, v in stack.items()}
    elif name == "fedtrimmedavg":  # beta 0.2 of 5: the lowest and the highest value of each weight cut
        expected = {k: np.sort(v, axis=0)[1:-1].mean(axis=0) for k, v in stack.items()}
    elif name == "krum":
        expected = states[int(np.argmin(scores))]
    else:  # the 5 - f = 4 best-scored replies, weighted by num-examples
        best = np.argsort(scores)[:4]
        w = np.array([WEIGHTS[i] for i in best], np.float64)
        expected = {k: np.tensordot(w / w.sum(), v[best], axes=1) for k, v in stack.items()}
    assert int(np.argmax(scores)) == 4, "the x1000 reply scores worst"
    for k, v in REFERENCE.items():
        assert got[k].dtype == v.dtype, f"{name} returns {k} in the dtype the server sent"
        np.testing.assert_allclose(got[k], np.asarray(expected[k], np.float64).astype(v.dtype), rtol=1e-3, atol=1e-4)
        assert np.abs(got[k].astype(np.float64) - v).max() < 0.1, f"{name} let the x1000 update in"


def test_krum_ranks_updates_that_are_small_next_to_the_weights(in_a_server_app):
    """Weights of norm ~450 moved by ~1e-2: Flower's |x|^2 + |y|^2 - 2 x.y in float32 is rounding noise at that size,
    as large as the distances themselves (which node it then scores best depends on numpy's float32 summation order);
    the strategy aggregates in float64 and picks numpy's node."""
    rng = np.random.default_rng(5)
    x = {"lora.w": (10 * rng.normal(size=2000)).astype(np.float32)}
    common = 1e-2 * rng.normal(size=2000) / np.sqrt(2000)
    states = [
        {"lora.w": (x["lora.w"] + common + 1e-3 * rng.normal(size=2000) / np.sqrt(2000)).astype(np.float32)}
        for _ in range(4)
    ]
    states.append({"lora.w": (x["lora.w"] - common).astype(np.float32)})  # sign-flipped
    in_float32 = compute_distances([numpy_to_record(s) for s in states])  # (5, 5), as Flower computes it
    flat = np.stack([s["lora.w"].astype(np.float64) for s in states])
    exact = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)  # squared distances, as Krum scores them
    assert np.abs(in_float32 - exact).max() >= exact.max(), "Flower's float32 errors are as large as the distances"
    scores = _krum_scores(states, f=1)
    _, got = _aggregate({"fed.strategy": "krum"}, states, x)
    assert int(np.argmax(scores)) == 4
    np.testing.assert_array_equal(got["lora.w"], states[int(np.argmin(scores))]["lora.w"])


@pytest.mark.parametrize(
    "run",
    [
        {},  # FedAvg
        {"fed.strategy": "fedavgm", "fed.server-momentum": 0.0, "fed.server-learning-rate": 1.0},  # = FedAvg
        {"fed.strategy": "fedmedian"},
    ],
)
def test_the_norm_bound_clips_the_scaled_reply_before_any_strategy_aggregates(in_a_server_app, run):
    states = _states(REFERENCE, seed=2)
    strategy, got = _aggregate({**run, "fed.update-norm-bound": 2.0}, states)
    norms = update_norms(states, REFERENCE)
    bound = 2.0 * np.median(norms)
    clipped = [
        {k: REFERENCE[k] + min(1.0, bound / n) * (s[k].astype(np.float64) - REFERENCE[k]) for k in s}
        for s, n in zip(states, norms)
    ]
    stack = {k: np.stack([c[k] for c in clipped]) for k in REFERENCE}
    if run.get("fed.strategy") == "fedmedian":
        expected = {k: np.median(v, axis=0) for k, v in stack.items()}
    else:
        w = np.array(WEIGHTS, np.float64)
        expected = {k: np.tensordot(w / w.sum(), v, axes=1) for k, v in stack.items()}
    for k in REFERENCE:
        np.testing.assert_allclose(got[k].astype(np.float64), expected[k], rtol=2e-3, atol=2e-4)
    assert strategy.round_costs["round-updates-clipped"] == 1.0
    assert strategy.round_costs["round-update-norm-bound"] == pytest.approx(bound, rel=1e-3)


# --- combinations ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "run, named",
    [
        ({"fed.strategy": "fedmedian", "dp.mode": "client-clip"}, ["'fed.strategy' = 'fedmedian'", "'dp.mode'"]),
        ({"fed.strategy": "krum", "dp.mode": "server-clip"}, ["'fed.strategy' = 'krum'", "'dp.mode' = 'server-clip'"]),
        (
            {"fed.strategy": "fedtrimmedavg", "fed.lora-aggregation": "product"},
            ["'fed.strategy' = 'fedtrimmedavg'", "'fed.lora-aggregation' = 'product'"],
        ),
        (
            {"fed.update-norm-bound": 3.0, "dp.mode": "client-clip"},
            ["'fed.update-norm-bound' = 3.0", "'dp.mode' = 'client-clip'"],
        ),
        ({"fed.update-norm-bound": 0.5}, ["'fed.update-norm-bound' = 0.5", ">= 1"]),
        ({"fed.update-norm-bound": 3.0, "fed.min-nodes": 2}, ["'fed.update-norm-bound' = 3.0", "fed.min-nodes = 2"]),
        ({"fed.strategy": "fedmedian", "fed.min-nodes": 2}, ["'fed.strategy' = 'fedmedian'", "fed.min-nodes = 2"]),
        ({"fed.strategy": "fedtrimmedavg", "fed.min-nodes": 4}, ["fed.trim-beta = 0.2", "fed.min-nodes = 4"]),
        ({"fed.strategy": "fedtrimmedavg", "fed.trim-beta": 0.5}, ["'fed.trim-beta' = 0.5"]),
        ({"fed.strategy": "krum", "fed.min-nodes": 4}, ["'fed.strategy' = 'krum'", "fed.min-nodes >= 2f + 3 = 5"]),
        ({"fed.strategy": "multikrum", "fed.multikrum-select": 5}, ["'fed.multikrum-select' = 5", "= 4"]),
        (
            {"fed.strategy": "fedmedian", "fed.server-learning-rate": 0.5},
            ["'fed.server-learning-rate' = 0.5", "'fed.strategy' = 'fedmedian'"],
        ),
        (
            {"fed.strategy": "fedmedian", "fed.client-ranks": "2,8"},
            ["'fed.client-ranks' = 2", "'fed.strategy' = 'fedmedian'"],
        ),
        (
            {"fed.update-norm-bound": 2.0, "fed.client-ranks": "4,8"},
            ["'fed.client-ranks' = 4", "'fed.update-norm-bound' = 2.0"],
        ),
    ],
)
def test_unsound_robust_combinations_are_refused_by_key_and_value(run, named):
    with pytest.raises(ConfigError) as e:
        AppConfig.from_flat({"fed.min-nodes": 5, **run})
    assert all(n in str(e.value) for n in named), str(e.value)


def test_a_node_of_lower_rank_refuses_a_robust_strategy_by_name():
    with pytest.raises(ConfigError, match="node-config key 'lora-rank' = 4 with 'fed.strategy' = 'fedmedian'"):
        AppConfig.from_flat({"fed.strategy": "fedmedian", "fed.min-nodes": 3}).node_rank(0, 4)


@pytest.mark.parametrize(
    "run",
    [
        {"fed.strategy": "fedmedian", "fed.lora-aggregation": "ffa", "dp.mode": "local"},  # local DP: post-processing
        {"fed.strategy": "multikrum", "fed.multikrum-select": 3},
        {"fed.strategy": "fedadam", "fed.update-norm-bound": 3.0},
        {"fed.lora-aggregation": "product", "fed.update-norm-bound": 1.0},
        {"fed.update-norm-bound": 2.0, "dp.mode": "local"},
    ],
)
def test_sound_robust_combinations_build(in_a_server_app, run):
    strategy = build_strategy(AppConfig.from_flat({"fed.min-nodes": 5, **run}), REFERENCE, None)
    assert strategy.update_norm_bound == run.get("fed.update-norm-bound", 0.0)
