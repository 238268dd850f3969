"""The Flower edge without a runtime: records, the checked FedAvg, and the ClientApp handlers on hand-built messages.

Real models, a real Qdrant Edge shard; Messages and Contexts built by hand (their Metadata too: outside a Flower
runtime `Message(content, dst_node_id=...)` has no run id to take).
The one-client federated round is checked bit for bit against `fedrag-app train` (centralized = one client).
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.errors import WeightsError
from fedrag_app.federation.exchange import flat_state, split_state, to_wire_update
from fedrag_app.flower import client_app
from fedrag_app.flower.records import metric_record, numpy_to_record, record_to_numpy
from fedrag_app.flower.server_training import evaluation_due
from tests.flower_helpers import TINY, checked, context, global_weights, message, peft_key, reply


# --- records -------------------------------------------------------------------------------------------------
def test_weights_round_trip_a_record_exactly_and_the_wire_dtype_applies_to_the_retriever_only():
    lora = {"a.lora_A.weight": torch.randn(2, 3), "a.lora_B.weight": torch.randn(3, 2)}
    retr = {"query.w": torch.randn(4)}
    record = numpy_to_record(flat_state(lora, retr))  # what client_app and server_app send (outgoing_state)
    assert list(record) == ["lora.a.lora_A.weight", "lora.a.lora_B.weight", "retriever.query.w"]
    back_lora, back_retr = split_state(record_to_numpy(record), lora, retr)
    assert all(torch.equal(back_lora[k], lora[k]) for k in lora) and torch.equal(back_retr["query.w"], retr["query.w"])
    sent = record_to_numpy(record)
    half = to_wire_update(sent, sent, "float16")  # a node's reply under retriever.wire-dtype = float16
    assert half["retriever.query.w"].dtype == np.float16 and half["lora.a.lora_A.weight"].dtype == np.float32


@pytest.mark.parametrize(
    "spoil, named",
    [
        (lambda s: s.update({"retriever.query.w": np.full(4, np.nan, np.float32)}), "NaN"),
        (lambda s: s.update({"retriever.query.w": np.zeros(5, np.float32)}), "shape"),
        (lambda s: s.pop("lora.a.lora_B.weight"), "missing"),
    ],
)
def test_unpack_refuses_weights_that_do_not_fit_and_names_them(spoil, named):
    lora, retr = (
        {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)},
        {"query.w": torch.zeros(4)},
    )
    state = flat_state(lora, retr)
    spoil(state)
    with pytest.raises(WeightsError, match=named):
        split_state(record_to_numpy(numpy_to_record(state)), lora, retr)


def test_a_small_retriever_update_survives_fp16_on_the_wire_and_the_server_rebuilds_fp32_weights():
    """An LSR-sized update (1e-5 per weight on weights of size 0.05) through the ClientApp's wire mod and the server's
    strategy: sent as an fp16 update, it comes back at cosine >= 0.999. Rounding whole weights to fp16, as the wire
    did before, keeps a cosine of about 0.64 with the intended update."""
    rng = np.random.default_rng(3)
    weights = (0.05 * rng.standard_normal(50_000)).astype(np.float32)
    update = (1e-5 * rng.standard_normal(50_000)).astype(np.float32)
    run = {"retriever.wire-dtype": "float16", "train.mode": "lsr"}
    sent = {"retriever.w": weights}
    trained = RecordDict(
        {
            "arrays": numpy_to_record({"retriever.w": weights + update}),
            "metrics": metric_record({"num-examples": 4, "bytes-sent": 200_000}),
        }
    )
    msg = message(RecordDict({"arrays": numpy_to_record(sent), "config": ConfigRecord({"server-round": 1})}), "train")
    fp32_bytes = trained["arrays"].count_bytes()
    out = client_app.wire_mod(msg, context({}, run), lambda m, c: Message(trained, reply_to=m))
    assert out.content["arrays"]["retriever.w"].numpy().dtype == np.float16
    assert out.content["metrics"]["bytes-sent"] == out.content["arrays"].count_bytes() < 0.51 * fp32_bytes
    arrays, _ = checked(sent, run).aggregate_train(1, [reply(out.content, 1)])
    rebuilt = record_to_numpy(arrays)["retriever.w"]
    assert rebuilt.dtype == np.float32
    cosine = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cosine(rebuilt.astype(np.float64) - weights, update) >= 0.999
    rounded = (weights + update).astype(np.float16).astype(np.float64) - weights.astype(np.float16)
    assert cosine(rounded, update) < 0.9, "whole weights in fp16 lose the update"


def test_metric_record_refuses_text():
    with pytest.raises(AssertionError, match="answer"):
        metric_record({"answer": "Paris"})


# --- the server's FedAvg ---------------------------------------------------------------------------------------
def _update(value: float, n: int, *, shape=(2, 2)) -> RecordDict:
    from fedrag_app.flower.records import numpy_to_record

    arrays = numpy_to_record(
        {"lora.w": np.full(shape, value, np.float32), "retriever.v": np.full(3, -value, np.float32)}
    )
    return RecordDict({"arrays": arrays, "metrics": metric_record({"num-examples": n, "loss": value})})


def test_checked_fedavg_weights_by_examples_and_drops_bad_updates(caplog):
    reference = {"lora.w": np.zeros((2, 2), np.float32), "retriever.v": np.zeros(3, np.float32)}
    strategy = checked(reference)
    replies = [
        reply(_update(1.0, 1), 1),
        reply(_update(4.0, 3), 2),
        reply(_update(float("nan"), 100), 3),  # NaN: dropped, not averaged
        reply(_update(9.0, 100, shape=(3, 2)), 4),  # wrong shape: dropped
        reply(Error(code=0, reason="node crashed"), 5),
    ]  # an error reply
    with caplog.at_level(logging.INFO):
        arrays, metrics = strategy.aggregate_train(1, replies)
    state = record_to_numpy(arrays)
    assert np.allclose(state["lora.w"], (1 * 1 + 3 * 4) / 4) and np.allclose(state["retriever.v"], -(13 / 4))
    assert metrics["loss"] == pytest.approx(13 / 4)
    text = caplog.text
    assert "Received 2 results and 1 failures" in text and "node crashed" in text  # counted after the drops
    assert "node 3" in text and "NaN" in text and "node 4" in text and "shape" in text
    costs = strategy.round_costs  # what the metrics row says, so a run with failed nodes cannot pass unnoticed
    assert costs["round-updates-averaged"] == 2 and costs["round-failures"] == 3


def test_a_reply_that_learned_from_no_question_is_left_out_not_failed(caplog):
    """Weight 0 (lsr.gate kept none of the node's questions): the node's unchanged weights would pull the average
    back toward the round's start, so they stay out, and a run that checks round-failures does not fail on it; its
    work still counts in the round's costs, and a weight-0 reply that is unsound is still a failure."""
    reference = {"lora.w": np.zeros((2, 2), np.float32), "retriever.v": np.zeros(3, np.float32)}
    strategy = checked(reference)
    empty = _update(0.0, 0)
    empty["metrics"]["local-seconds"] = 7.0
    broken = _update(float("nan"), 0)
    with caplog.at_level(logging.INFO):
        arrays, _ = strategy.aggregate_train(2, [reply(_update(2.0, 3), 1), reply(empty, 2), reply(broken, 3)])
    assert np.allclose(record_to_numpy(arrays)["lora.w"], 2.0)
    assert "node 2 learned from no question in round 2" in caplog.text and "node 2 in round" not in caplog.text
    assert "dropped the update of node 3" in caplog.text and "NaN" in caplog.text
    costs = strategy.round_costs
    assert costs["round-updates-averaged"] == 1 and costs["round-updates-empty"] == 1 and costs["round-failures"] == 1
    assert costs["round-local-seconds-max"] == 7.0
    assert costs["round-bytes-up"] == 2 * reply(empty, 2).content["arrays"].count_bytes()
    alone = checked(reference)
    assert alone.aggregate_train(1, [reply(_update(0.0, 0), 1), reply(_update(1.0, 0), 2)]) == (None, None)
    assert alone.last_train_metrics["loss"] == pytest.approx(0.5), "every node empty: their metrics, unweighted"
    assert alone.round_costs["round-failures"] == 0 and alone.round_costs["round-updates-empty"] == 2


def test_lsr_shares_are_pooled_by_their_own_counts_across_nodes_the_empty_ones_too():
    """Flower averages metrics by the FedAvg weight; in an LSR round that is lsr-examples, the questions the gate kept,
    so a keep rate averaged by it counts a node by its own rate (0.9 x 9 + 0.1 x 1) / 10 = 0.82, and an empty node,
    left out of the average, not at all. Pooled by the questions each node asked, 10 of 30 were kept."""
    reference = {"lora.w": np.zeros((2, 2), np.float32), "retriever.v": np.zeros(3, np.float32)}

    def node(kept: int, value: float) -> RecordDict:
        update = _update(value, kept)
        update["metrics"]["lsr-gate-kept"], update["metrics"]["lsr-gate-asked"] = kept / 10, 10.0
        update["metrics"]["lsr-scores-cached"], update["metrics"]["lsr-scored"] = 1.0 if kept > 5 else 0.0, 40.0
        return update

    strategy = checked(reference)
    _, metrics = strategy.aggregate_train(3, [reply(node(9, 1.0), 1), reply(node(1, 2.0), 2), reply(node(0, 0.0), 3)])
    assert strategy.round_costs["round-updates-empty"] == 1
    for shown in (metrics, strategy.last_train_metrics):
        assert shown["lsr-gate-kept"] == pytest.approx(10 / 30)
        assert shown["lsr-scores-cached"] == pytest.approx(1 / 3)
        assert shown["loss"] == pytest.approx((9 * 1.0 + 1 * 2.0) / 10), "other metrics: Flower's weighted mean"
    alone = checked(reference)
    alone.aggregate_train(1, [reply(node(0, 0.0), 1), reply(node(0, 1.0), 2)])
    assert alone.last_train_metrics["lsr-gate-kept"] == 0.0


def test_checked_fedavg_returns_nothing_when_every_update_is_bad():
    reference = {"lora.w": np.zeros((2, 2), np.float32), "retriever.v": np.zeros(3, np.float32)}
    assert checked(reference).aggregate_train(1, [reply(_update(float("inf"), 2), 1)]) == (None, None)


# --- the ClientApp handlers ----------------------------------------------------------------------------------------
def test_train_reply_is_one_array_record_and_scalar_metrics_with_changed_weights(node):
    cfg = AppConfig.from_flat(TINY)
    sent = global_weights(cfg)
    content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})})
    out = client_app.train(message(content, "train"), context(node, TINY))
    assert set(out.content.array_records) == {"arrays"} and set(out.content.metric_records) == {"metrics"}
    assert not out.content.config_records, "a train reply carries no text"
    got, before = record_to_numpy(out.content["arrays"]), record_to_numpy(sent)
    assert sorted(got) == sorted(before)
    assert any(not np.array_equal(got[k], before[k]) for k in got if k.startswith("lora.")), "RALT moved no LoRA weight"
    assert any(not np.array_equal(got[k], before[k]) for k in got if k.startswith("retriever.")), (
        "LSR moved no retriever weight"
    )
    metrics = out.content["metrics"]
    assert metrics["num-examples"] == 4 and metrics["ralt-steps"] == 1 and metrics["lsr-steps"] == 1
    assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_evaluate_reply_is_scalars_only(node):
    cfg = AppConfig.from_flat(TINY)
    content = RecordDict({"arrays": global_weights(cfg), "config": ConfigRecord({"server-round": 1})})
    out = client_app.evaluate(message(content, "evaluate"), context(node, TINY))
    assert not out.content.array_records and not out.content.config_records
    metrics = out.content["metrics"]
    assert metrics["num-examples"] == 2 and 0 <= metrics["client-wq-f1"] <= 1
    assert 0 <= metrics["client-retrieval-recall@5"] <= 1


def test_retrieval_query_is_refused_unless_the_node_opts_in(node):
    content = RecordDict({"query": ConfigRecord({"question": "who founded the red cross", "top-k": 2})})
    with pytest.raises(Exception, match="federated-retrieval"):
        client_app.retrieve_passages(message(content, "query.retrieve"), context(node, TINY))
    out = client_app.retrieve_passages(
        message(content, "query.retrieve"), context({**node, "federated-retrieval": True}, TINY)
    )
    docs = out.content["docs"]
    assert len(docs["ids"]) == len(docs["texts"]) == 2 and all(isinstance(t, str) and t for t in docs["texts"])


def test_a_federated_run_refuses_to_train_the_context_encoder_by_name():
    """Only centralized training re-indexes after LSR trains the context encoder: nodes' shards and the server's store
    would keep the old encoder's vectors, so the ServerApp and the ClientApp both refuse the option."""
    from fedrag_app.core.errors import ConfigError
    from fedrag_app.flower import server_app

    run = {**TINY, "retriever.train-context-encoder": True}
    content = RecordDict({"arrays": numpy_to_record({}), "config": ConfigRecord({"server-round": 1})})
    with pytest.raises(ConfigError, match="retriever.train-context-encoder"):
        client_app.train(message(content, "train"), context({}, run))
    with pytest.raises(ConfigError, match="retriever.train-context-encoder"):
        server_app.main(object(), context({}, run))


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"data-path": 7}, "data-path"),
        ({"data-path": "rel/train.jsonl"}, "absolute"),
        ({"qdrant-path": "/x"}, "qdrant-path"),
    ],
)
def test_bad_node_config_names_the_key(node, bad, named):
    from fedrag_app.core.errors import ConfigError

    content = RecordDict(
        {"arrays": global_weights(AppConfig.from_flat(TINY)), "config": ConfigRecord({"server-round": 1})}
    )
    with pytest.raises(ConfigError, match=named):
        client_app.train(message(content, "train"), context({**node, **bad}, TINY))


def test_one_client_federated_round_equals_centralized_training(node, small_shard_path, tmp_path):
    """Centralized mode is the single-client case: same data, seed and start -> the same weights, bit for bit."""
    from peft.utils import load_peft_weights

    from fedrag_app.rag.retriever import load_retriever
    from fedrag_app.training.centralized import train_centralized

    central_data = tmp_path / "data" / "web_questions"  # centralized trains on the train split: the node's questions
    central_data.mkdir(parents=True)
    shutil.copy(node["data-path"], central_data / "train.jsonl")
    run = {
        **TINY,
        "fed.num-server-rounds": 1,
        "train.output-dir": str(tmp_path / "central"),
        "store.path": small_shard_path,
        "data.dir": str(tmp_path / "data"),
    }
    cfg = AppConfig.from_flat(run)
    client_app._MODELS.clear()  # the client starts from a fresh load, as train_centralized does
    sent = global_weights(cfg)
    content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})})
    out = client_app.train(message(content, "train"), context(node, run))
    arrays, _ = checked(record_to_numpy(sent), run).aggregate_train(1, [reply(out.content, 1)])  # the server's path
    federated = record_to_numpy(arrays)

    history = train_centralized(cfg, progress=False)
    adapter = load_peft_weights(str(tmp_path / "central" / "adapter"), device="cpu")
    central = load_retriever(cfg.retriever, path=str(tmp_path / "central" / "retriever")).trainable_state_dict()
    assert history[0]["ralt-loss-mean"] == out.content["metrics"]["ralt-loss-mean"]
    assert history[0]["lsr-loss-mean"] == out.content["metrics"]["lsr-loss-mean"]
    lora_keys = [k for k in federated if k.startswith("lora.")]
    assert lora_keys and all(torch.equal(torch.from_numpy(federated[k]), adapter[peft_key(k)]) for k in lora_keys)
    assert {k for k in federated if k.startswith("retriever.")} == {f"retriever.{k}" for k in central}
    for key, value in central.items():
        assert torch.equal(torch.from_numpy(federated[f"retriever.{key}"]), value), key


@pytest.mark.parametrize("mode, prefixes", [("ralt", {"lora."}), ("lsr", {"retriever."})])
def test_only_what_the_mode_trains_travels(node, mode, prefixes):
    from fedrag_app.federation.exchange import outgoing_state

    run = {**TINY, "train.mode": mode}
    cfg = AppConfig.from_flat(run)
    gen, retriever = client_app._models(cfg)
    sent = numpy_to_record(outgoing_state(cfg, gen, retriever))
    assert {k.split(".", 1)[0] + "." for k in sent} == prefixes
    out = client_app.train(
        message(RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})}), "train"), context(node, run)
    )
    assert sorted(out.content["arrays"]) == sorted(sent)
    assert out.content["metrics"]["bytes-sent"] == sent.count_bytes()


def test_pulls_are_retried_on_a_superlink_5xx_but_not_on_other_errors():
    from types import SimpleNamespace

    from fedrag_app.flower.server_app import retry_transient_pulls

    class Grid:
        def __init__(self, failures):
            self.failures, self.calls = list(failures), 0

        def pull_messages(self, ids):
            self.calls += 1
            if self.failures:
                error = RuntimeError("HTTP error")
                error.response = SimpleNamespace(status_code=self.failures.pop(0))
                raise error
            return [f"reply to {i}" for i in ids]

    waits = []
    grid = Grid([500, 503])
    retry_transient_pulls(grid, sleep=waits.append)
    assert grid.pull_messages({"m1"}) == ["reply to m1"] and grid.calls == 3 and waits == [2, 4]
    refused = Grid([403])
    retry_transient_pulls(refused, sleep=waits.append)
    with pytest.raises(RuntimeError):
        refused.pull_messages({"m1"})
    assert refused.calls == 1


def test_server_evaluation_runs_every_n_rounds_and_after_the_last():
    fed = AppConfig.from_flat({"fed.num-server-rounds": 5, "fed.server-eval-every": 2}).fed
    assert [n for n in range(1, 6) if evaluation_due(fed, n)] == [2, 4, 5]
    off = AppConfig.from_flat({"fed.server-eval": False}).fed
    assert not any(evaluation_due(off, n) for n in range(1, 3))
