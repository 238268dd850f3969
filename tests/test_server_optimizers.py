"""fed.strategy (Flower's server optimizers) and train.keep-optimizer-state: the maths against hand computations,
the refused combinations, resume, and a node's AdamW state kept in its own context.state (never in a reply)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.errors import ConfigError
from fedrag_app.federation.exchange import outgoing_state
from fedrag_app.flower import client_app
from fedrag_app.flower.records import metric_record, numpy_to_record, record_to_numpy
from fedrag_app.flower.strategies import build_strategy
from fedrag_app.training.optimizer_state import keep_optimizer, restore_optimizer
from tests.flower_helpers import TINY, Nodes, context, global_weights, message, reply

REFERENCE = {"lora.w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "retriever.v": np.ones(5, np.float32)}
WEIGHTS = (1, 2, 5)  # num-examples of the three nodes


def _replies(x: dict, server_round: int) -> tuple[list, dict]:
    """Three distinct replies around the global weights ``x``, and their weighted mean (float64)."""
    rng = np.random.default_rng(server_round)
    states = [
        {k: (v + rng.normal(0, 0.1 * (i + 1), v.shape)).astype(np.float32) for k, v in x.items()} for i in range(3)
    ]
    replies = [
        reply(RecordDict({"arrays": numpy_to_record(s), "metrics": metric_record({"num-examples": n})}), i + 1)
        for i, (s, n) in enumerate(zip(states, WEIGHTS))
    ]
    mean = {k: sum(n * s[k].astype(np.float64) for s, n in zip(states, WEIGHTS)) / sum(WEIGHTS) for k in x}
    return replies, mean


def _run(strategy, rounds: range, x: dict, *, done: int = 0) -> dict:
    """Rounds as Flower's start() drives them: configure with the global weights, aggregate the replies (those of
    absolute round ``done`` + r: a resumed server counts from 1 again)."""
    for r in rounds:
        list(strategy.configure_train(r, numpy_to_record(x), ConfigRecord({}), Nodes(3)))
        arrays, _ = strategy.aggregate_train(r, _replies(x, done + r)[0])
        x = record_to_numpy(arrays)
    return x


def test_fedavgm_matches_server_sgd_with_momentum_over_three_rounds(in_a_server_app):
    lr, beta = 0.7, 0.9
    strategy = build_strategy(
        AppConfig.from_flat(
            {"fed.min-nodes": 3, "fed.strategy": "fedavgm", "fed.server-learning-rate": lr, "fed.server-momentum": beta}
        ),
        REFERENCE,
        None,
    )
    assert isinstance(strategy.aggregator, FedAvgM)
    x, expected, momentum = dict(REFERENCE), {k: v.astype(np.float64) for k, v in REFERENCE.items()}, None
    for r in (1, 2, 3):
        _, mean = _replies(x, r)
        g = {k: expected[k] - mean[k] for k in x}  # the pseudo-gradient: minus the average update
        momentum = g if momentum is None else {k: beta * momentum[k] + g[k] for k in x}
        expected = {k: expected[k] - lr * momentum[k] for k in x}
        x = _run(strategy, range(r, r + 1), x)
        for k in x:
            assert x[k].dtype == np.float32
            np.testing.assert_allclose(x[k], expected[k], rtol=1e-5, atol=1e-6)


def test_fedadam_matches_the_adam_step_on_the_average_update_over_three_rounds(in_a_server_app):
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-6
    run = {
        "fed.min-nodes": 3,
        "fed.strategy": "fedadam",
        "fed.server-learning-rate": eta,
        "fed.server-beta-1": b1,
        "fed.server-beta-2": b2,
        "fed.server-tau": tau,
    }
    strategy = build_strategy(AppConfig.from_flat(run), REFERENCE, None)
    assert isinstance(strategy.aggregator, FedAdam)
    x = dict(REFERENCE)
    expected = {k: v.astype(np.float64) for k, v in REFERENCE.items()}
    m = {k: 0.0 for k in x}
    v = {k: 0.0 for k in x}
    for r in (1, 2, 3):
        _, mean = _replies(x, r)
        step = eta * np.sqrt(1 - b2 ** (r + 1)) / (1 - b1 ** (r + 1))  # Flower's bias correction, rounds from 1
        for k in x:
            delta = mean[k] - x[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * delta
            v[k] = b2 * v[k] + (1 - b2) * delta**2
            expected[k] = x[k].astype(np.float64) + step * m[k] / (np.sqrt(v[k]) + tau)
        x = _run(strategy, range(r, r + 1), x)
        for k in x:
            assert x[k].dtype == np.float32, "the server sends what it received: float32, not Flower's float64"
            np.testing.assert_allclose(x[k], expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_a_resumed_server_optimizer_continues_exactly(in_a_server_app, name):
    """Three rounds in one run equal two rounds, a checkpointed state, and a resumed run's third round."""
    run = AppConfig.from_flat({"fed.min-nodes": 3, "fed.strategy": name, "fed.server-learning-rate": 0.05})
    whole = _run(build_strategy(run, REFERENCE, None), range(1, 4), dict(REFERENCE))
    first = build_strategy(run, REFERENCE, None)
    x = _run(first, range(1, 3), dict(REFERENCE))
    state = first.aggregator.optimizer_state()
    assert state and all(key.startswith(f"{name}/") for key in state)
    resumed = build_strategy(run, REFERENCE, None, rounds_done=2)
    assert resumed.aggregator.restore_optimizer_state(state, REFERENCE)
    x = _run(resumed, range(1, 2), x, done=2)
    for k in x:
        np.testing.assert_allclose(x[k], whole[k], rtol=1e-6, atol=1e-7)
    other = build_strategy(
        AppConfig.from_flat({"fed.strategy": "fedyogi" if name != "fedyogi" else "fedadam"}), REFERENCE, None
    )
    assert not other.aggregator.restore_optimizer_state(state, REFERENCE), "another strategy's state must not load"


def test_server_optimizers_compose_with_ffa_and_local_dp_and_return_float32(in_a_server_app):
    """FedAdam over FFA-LoRA replies under local DP: its step is the textbook one on the mean update, and the
    aggregate comes back float32 (the dtype the server sent), though Flower's FedAdam computes in float64."""
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 1e-6
    run = {
        "fed.min-nodes": 3,
        "fed.strategy": "fedadam",
        "fed.lora-aggregation": "ffa",
        "dp.mode": "local",
        "fed.server-learning-rate": eta,
    }
    strategy = build_strategy(AppConfig.from_flat(run), REFERENCE, None)
    sent = {**REFERENCE, "retriever.v": np.zeros(5, np.float32)}  # updates of ~1e-4
    list(strategy.configure_train(1, numpy_to_record(sent), ConfigRecord({}), Nodes(3)))
    replies = [
        reply(
            RecordDict(
                {
                    "arrays": numpy_to_record(
                        {
                            "lora.w": sent["lora.w"] + np.float32(0.01 * i),
                            "retriever.v": np.full(5, 1e-4 * i, np.float32),
                        }
                    ),
                    "metrics": metric_record({"dp-weight": 1}),  # under any DP mode nodes weigh the same
                }
            ),
            i,
        )
        for i in (1, 2, 3)
    ]
    got = record_to_numpy(strategy.aggregate_train(1, replies)[0])
    assert got["retriever.v"].dtype == np.float32 and got["lora.w"].dtype == np.float32
    delta = np.mean([np.float32(1e-4 * i) for i in (1, 2, 3)], dtype=np.float64)
    step = eta * np.sqrt(1 - b2**2) / (1 - b1**2) * (1 - b1) * delta / (np.sqrt(1 - b2) * delta + tau)
    np.testing.assert_allclose(got["retriever.v"].astype(np.float64), step, rtol=1e-3)


@pytest.mark.parametrize(
    "run, named",
    [
        (
            {"fed.strategy": "fedadam", "dp.mode": "server-clip"},
            ["'fed.strategy' = 'fedadam'", "'dp.mode' = 'server-clip'"],
        ),
        (
            {"fed.strategy": "fedavgm", "dp.mode": "client-clip"},
            ["'fed.strategy' = 'fedavgm'", "'dp.mode' = 'client-clip'"],
        ),
        (
            {"fed.strategy": "fedyogi", "fed.lora-aggregation": "product"},
            ["'fed.strategy' = 'fedyogi'", "'fed.lora-aggregation' = 'product'"],
        ),
        ({"fed.server-learning-rate": 0.5}, ["'fed.server-learning-rate' = 0.5", "'fed.strategy' = 'fedavg'"]),
        (
            {"fed.strategy": "fedadam", "fed.client-ranks": "2,8"},
            ["'fed.client-ranks' = 2", "'fed.strategy' = 'fedadam'"],
        ),
        ({"fed.strategy": "fedsgd"}, ["'fed.strategy' = 'fedsgd'"]),
        ({"fed.strategy": "fedavgm", "fed.server-momentum": 1.0}, ["'fed.server-momentum' = 1.0"]),
    ],
)
def test_unsound_combinations_are_refused_by_key_and_value(run, named):
    with pytest.raises(ConfigError) as e:
        AppConfig.from_flat(run)
    assert all(n in str(e.value) for n in named), str(e.value)


def test_a_node_of_lower_rank_refuses_a_server_optimizer_by_name():
    with pytest.raises(ConfigError, match="node-config key 'lora-rank' = 4 with 'fed.strategy' = 'fedyogi'"):
        AppConfig.from_flat({"fed.strategy": "fedyogi"}).node_rank(0, 4)


# --- a node's optimizer state ------------------------------------------------------------------------------------
def _adamw_steps(keep: bool, rounds: int = 3) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    layer, state = torch.nn.Linear(3, 2), {} if keep else None
    for r in range(rounds):
        optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.0)  # re-created every round
        restore_optimizer(optimizer, state)
        layer(torch.full((1, 3), float(r + 1))).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        keep_optimizer(optimizer, state)
    return layer.weight.detach().clone(), state


def test_kept_adamw_state_equals_one_optimizer_over_all_rounds():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.0)
    for r in range(3):
        layer(torch.full((1, 3), float(r + 1))).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    kept, state = _adamw_steps(keep=True)
    assert torch.equal(kept, layer.weight.detach()) and state["0.step"] == 3
    fresh, _ = _adamw_steps(keep=False)
    assert not torch.allclose(fresh, kept)


def test_the_client_keeps_its_adamw_state_in_its_context_never_in_the_reply(node):
    run = {**TINY, "train.keep-optimizer-state": True}
    sent = global_weights(AppConfig.from_flat(run))
    ctx = context(node, run)

    def train(r: int, c):
        content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": r})})
        out = client_app.train(message(content, "train"), c)
        assert set(out.content.keys()) == {"arrays", "metrics"} and sorted(out.content["arrays"]) == sorted(sent)
        assert out.content["arrays"].count_bytes() == sent.count_bytes(), "the reply carries the weights only"
        return record_to_numpy(out.content["arrays"])

    kept_replies = []
    for r in (1, 2, 3):  # the same global weights each round: only the optimizer state can tell rounds apart
        kept_replies.append(train(r, ctx))
        for phase in ("ralt", "lsr"):
            steps = ctx.state[f"optimizer-{phase}-steps"]
            assert steps and set(steps.values()) == {r}, f"{phase} AdamW steps do not continue: {dict(steps)}"
            assert len(ctx.state[f"optimizer-{phase}"]) == 2 * len(steps)  # exp_avg and exp_avg_sq per parameter
    fresh_ctx = context(node, TINY)
    fresh = [train(r, fresh_ctx) for r in (1, 2)]
    assert not fresh_ctx.state.array_records and not fresh_ctx.state.config_records, "without the key nothing is kept"
    assert all(np.array_equal(fresh[0][k], kept_replies[0][k]) for k in sent), "round 1 starts fresh either way"
    lora = [k for k in sent if k.startswith("lora.")]
    assert any(not np.array_equal(fresh[1][k], kept_replies[1][k]) for k in lora), "kept moments changed nothing"


def test_a_checkpoint_carries_the_server_optimizers_state(tmp_path, generator, retriever):
    from fedrag_app.federation.checkpoint import load_server_state, save_checkpoint

    state = {"fedadam/m/lora.w": np.arange(6, dtype=np.float32).reshape(2, 3), "fedadam/v/lora.w": np.ones((2, 3))}
    with_state = save_checkpoint(tmp_path, 1, generator, retriever, {}, {}, server_state=state)
    got = load_server_state(with_state)
    assert sorted(got) == sorted(state) and all(np.array_equal(got[k], state[k]) for k in state)
    assert load_server_state(save_checkpoint(tmp_path, 2, generator, retriever, {}, {})) == {}  # FedAvg: none


def test_centralized_training_keeps_adamw_across_rounds_as_a_one_node_federation_does(node, small_shard_path, tmp_path):
    """Two rounds of `fedrag-app train` with the key give, bit for bit, what two rounds of one node give with it."""
    from peft.utils import load_peft_weights

    from fedrag_app.training.centralized import train_centralized
    from tests.flower_helpers import checked, peft_key

    central_data = tmp_path / "data" / "web_questions"  # centralized trains on the train split: the node's questions
    central_data.mkdir(parents=True)
    shutil.copy(node["data-path"], central_data / "train.jsonl")
    run = {
        **TINY,
        "train.mode": "ralt",
        "fed.num-server-rounds": 2,
        "train.output-dir": str(tmp_path / "central"),
        "store.path": small_shard_path,
        "train.keep-optimizer-state": True,
        "data.dir": str(tmp_path / "data"),
    }
    cfg = AppConfig.from_flat(run)
    client_app._MODELS.clear()  # the client starts from a fresh load, as train_centralized does
    sent, ctx = numpy_to_record(outgoing_state(cfg, *client_app._models(cfg))), context(node, run)  # LoRA only
    for r in (1, 2):
        content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": r})})
        out = client_app.train(message(content, "train"), ctx)
        sent, _ = checked(record_to_numpy(sent), run).aggregate_train(r, [reply(out.content, 1)])
    federated = record_to_numpy(sent)
    train_centralized(cfg, progress=False)
    adapter = load_peft_weights(str(tmp_path / "central" / "adapter"), device="cpu")
    lora_keys = [k for k in federated if k.startswith("lora.")]
    assert lora_keys and all(torch.equal(torch.from_numpy(federated[k]), adapter[peft_key(k)]) for k in lora_keys)
    train_centralized(AppConfig.from_flat({**run, "train.keep-optimizer-state": False}), progress=False)
    fresh = load_peft_weights(str(tmp_path / "central" / "adapter"), device="cpu")
    assert any(not torch.equal(fresh[peft_key(k)], adapter[peft_key(k)]) for k in lora_keys)
