"""Client-level DP, LoRA-aware aggregation and personal adapters through the real Flower pieces: the ClientApp
with its DP mod on hand-built messages (real SmolLM2 + MiniLM, a real shard), and the ServerApp's strategy as
main() builds it (Flower's DP wrappers and RDP accountant), fed with hand-built replies.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedrag_app.config.app_config import AppConfig
from fedrag_app.config.runtime import apply_runtime
from fedrag_app.core.errors import ConfigError
from fedrag_app.flower import client_app
from fedrag_app.flower.records import metric_record, numpy_to_record, record_to_numpy
from fedrag_app.rag.generator import load_generator, lora_a_fingerprint
from tests.flower_helpers import RALT, TINY, Nodes, checked, client_round, context, message, rdp_epsilon, reply


def _update_norm(reply_record, sent_record) -> float:
    got, sent = record_to_numpy(reply_record), record_to_numpy(sent_record)
    return float(np.sqrt(sum(np.sum((got[k].astype(np.float64) - sent[k]) ** 2) for k in sent)))


# --- client-side DP ------------------------------------------------------------------------------------------------
def test_client_clip_bounds_the_update_norm_on_the_reply_message(node):
    clip = 1e-3
    sent, plain = client_round(RALT, node)
    assert _update_norm(plain.content["arrays"], sent) > 10 * clip, "the test needs an update larger than the clip"
    run = {**RALT, "dp.mode": "client-clip", "dp.clipping-norm": clip}
    sent, clipped = client_round(run, node, clipping_norm=clip)  # the key Flower's DP wrapper puts in the config
    assert sorted(clipped.content["arrays"]) == sorted(sent), "the mod needs the reply keys the server sent"
    assert _update_norm(clipped.content["arrays"], sent) <= clip * 1.001  # fp32 rounding of weight + clipped update
    assert clipped.content["metrics"]["dp-weight"] == 1


def _gaussian_delta(sigma: float, sensitivity: float, eps: float) -> float:
    """The exact delta at ``eps`` of the Gaussian mechanism (Balle & Wang 2018, Theorem 8)."""
    from math import erfc, exp, sqrt

    cdf = lambda x: 0.5 * erfc(-x / sqrt(2))  # noqa: E731
    a, b = sensitivity / (2 * sigma), eps * sigma / sensitivity
    return cdf(a - b) - exp(eps) * cdf(-a - b)


def test_fp16_updates_on_the_wire_compose_with_client_clipping(node):
    """The wire mod is outermost: fixedclipping_mod clips the fp32 weights against what was received, then the
    retriever update goes out in fp16; the weights the server rebuilds are within the clipping norm."""
    from fedrag_app.flower.records import from_wire_update

    clip = 1e-3
    run = {
        **TINY,
        "train.mode": "lsr",
        "retriever.wire-dtype": "float16",
        "dp.mode": "client-clip",
        "dp.clipping-norm": clip,
    }
    sent, out = client_round(run, node, clipping_norm=clip)
    arrays = out.content["arrays"]
    assert list(arrays) == list(sent) and all(a.numpy().dtype == np.float16 for a in arrays.values())
    norm = _update_norm(from_wire_update(arrays, record_to_numpy(sent)), sent)
    # fp16 rounds the clipped update: at norm 1e-3 over millions of weights its elements (~1e-6) are fp16 subnormals,
    # whose rounding moves the norm by up to ~1% (seen: 1.0104 C); a 2% bound still catches an unclipped update.
    assert 0.5 * clip < norm <= clip * 1.02, "clipped (LSR moves the query encoder by more than 1e-3) and intact"


def test_local_dp_adds_noise_of_the_analytic_std_and_never_the_same_noise_twice(node):
    """Local DP hides a node's whole dataset: swapping it moves the clipped update anywhere in the C-ball, so two
    updates differ by up to 2C and the noise is calibrated to sensitivity 2C. At epsilon = 16 the classic formula
    (Flower's LocalDpMod) is too small for the reported delta; the node adds the analytic Gaussian sigma."""
    from fedrag_app.federation.gaussian_dp import gaussian_sigma

    clip, eps, delta = 1e-4, 16.0, 1e-5
    run = {**RALT, "dp.mode": "local", "dp.clipping-norm": clip, "dp.local-epsilon": eps, "dp.delta": delta}
    sent, first = client_round(run, node)
    _, second = client_round(run, node)  # the same seeded training: only the noise may differ
    expected = gaussian_sigma(eps, delta, 2 * clip)
    classic = 2 * clip * np.sqrt(2 * np.log(1.25 / delta)) / eps
    assert _gaussian_delta(expected, 2 * clip, eps) <= delta < _gaussian_delta(classic, 2 * clip, eps)
    noise = [
        np.concatenate(
            [(record_to_numpy(out.content["arrays"])[k] - record_to_numpy(sent)[k]).ravel() for k in sorted(sent)]
        )
        for out in (first, second)
    ]
    assert noise[0].size > 100_000
    assert np.std(noise[0]) == pytest.approx(expected, rel=0.01)  # the clipped update (norm <= 1e-4) is negligible
    assert abs(expected / classic - 1) > 0.1, "the two calibrations differ by more than the test's tolerance"
    assert np.corrcoef(noise[0], noise[1])[0, 1] < 0.01, "two rounds drew the same noise: it is predictable"


@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 8.5, 12.0, 16.0, 32.0, 64.0])
def test_the_analytic_sigma_gives_exactly_the_configured_delta_at_every_epsilon(eps):
    """At the computed sigma the exact delta (Balle & Wang, Theorem 8, written out in this file) is at most the
    configured one, and 0.1% less noise would exceed it: no more noise than needed."""
    from fedrag_app.federation.gaussian_dp import gaussian_sigma

    delta, sensitivity = 1e-5, 2 * 0.05
    sigma = gaussian_sigma(eps, delta, sensitivity)
    assert _gaussian_delta(sigma, sensitivity, eps) <= delta < _gaussian_delta(0.999 * sigma, sensitivity, eps)
    if eps == 16.0:  # the classic formula is not (16, 1e-5)-DP: its delta is 34 times the configured one
        classic = sensitivity * np.sqrt(2 * np.log(1.25 / delta)) / eps
        assert _gaussian_delta(classic, sensitivity, eps) > 30 * delta


def _pld_delta(eps: float, mu: float) -> float:
    """delta(eps) = E[(1 - e^(eps - L))+] for the privacy loss L ~ N(mu^2/2, mu^2) of a Gaussian mechanism with
    Delta/sigma = mu, integrated numerically: the definition, independent of the closed form."""
    eta = mu * mu / 2
    loss = np.linspace(eps, eta + 40 * mu, 400_001)
    pdf = np.exp(-((loss - eta) ** 2) / (2 * mu * mu)) / (mu * np.sqrt(2 * np.pi))
    return float(np.trapezoid((1 - np.exp(eps - loss)) * pdf, loss))


def test_local_epsilon_over_rounds_is_composed_by_an_accountant_not_summed():
    """Each round a node releases a Gaussian mechanism of noise multiplier z = sigma / 2C; R of them are exactly one of
    z / sqrt(R). One round gives back the configured epsilon; R rounds cost less than R x epsilon and no more than
    Flower's RDP accountant says, and the delta of the privacy-loss distribution at the reported epsilon is delta."""
    from fedrag_app.federation.gaussian_dp import composed_epsilon, gaussian_sigma

    clip, eps, delta = 0.05, 8.0, 1e-5
    run = {"dp.mode": "local", "dp.clipping-norm": clip, "dp.local-epsilon": eps, "dp.delta": delta}
    strategy, cfg = checked({"lora.w": np.zeros(4, np.float32)}, run), AppConfig.from_flat(run).dp
    z = gaussian_sigma(eps, delta, 2 * clip) / (2 * clip)
    one = strategy.privacy_metrics(1, cfg)
    assert one["dp-epsilon"] == pytest.approx(eps, rel=1e-9) and one["dp-noise-multiplier"] == pytest.approx(z)
    for rounds in (2, 5, 20):
        spent = strategy.privacy_metrics(rounds, cfg)
        assert spent["dp-delta"] == delta and spent["dp-releases"] == rounds
        assert spent["dp-epsilon"] < rounds * eps, "basic composition (the sum) is what it replaces"
        assert spent["dp-epsilon"] <= rdp_epsilon(z, rounds, delta), "exact composition is at most RDP's bound"
        assert _pld_delta(spent["dp-epsilon"], np.sqrt(rounds) / z) == pytest.approx(delta, rel=1e-4)
    assert composed_epsilon(1.0, 1, 0.3829249225480262 * 1.0000001) < 1e-6, "delta(0) of 1-GDP is 2 Phi(1/2) - 1"
    assert strategy.privacy_metrics(5, cfg)["dp-epsilon"] == pytest.approx(22.16, abs=0.01)  # docs/PRIVACY.md's figure


# --- server-side DP ------------------------------------------------------------------------------------------------
def _dp_replies(n: int, states: list[dict]):
    return [
        reply(
            RecordDict(
                {"arrays": numpy_to_record(s), "metrics": metric_record({"num-examples": 10 + i, "dp-weight": 1})}
            ),
            i + 1,
        )
        for i, s in enumerate(states)
    ]


def test_server_clip_clips_every_reply_to_the_clipping_norm(in_a_server_app):
    reference = {"lora.w": np.zeros(1000, np.float32)}
    run = {"dp.mode": "server-clip", "dp.clipping-norm": 0.5, "dp.noise-multiplier": 0.0, "fed.min-nodes": 3}
    strategy = checked(reference, run)
    list(strategy.configure_train(1, numpy_to_record(reference), ConfigRecord({}), Nodes(3)))
    replies = _dp_replies(3, [{"lora.w": np.full(1000, v, np.float32)} for v in (0.01, 1.0, -3.0)])
    arrays, _ = strategy.aggregate_train(1, replies)
    norms = [_update_norm(r.content["arrays"], numpy_to_record(reference)) for r in replies]
    assert norms[0] == pytest.approx(0.01 * np.sqrt(1000), rel=1e-5)  # under the bound: untouched
    assert norms[1] == pytest.approx(0.5, rel=1e-5) and norms[2] == pytest.approx(0.5, rel=1e-5)
    clipped = 0.5 / np.sqrt(1000)  # per element, for the two replies over the bound
    assert np.allclose(record_to_numpy(arrays)["lora.w"], (0.01 + clipped - clipped) / 3, atol=1e-6)


def test_central_noise_has_the_configured_std_and_epsilon_matches_the_accountant(in_a_server_app):
    z, clip, m, rounds = 2.0, 0.5, 3, 3
    reference = {"lora.w": np.zeros(200_000, np.float32)}
    run = {
        "dp.mode": "client-clip",
        "dp.clipping-norm": clip,
        "dp.noise-multiplier": z,
        "dp.delta": 1e-5,
        "fed.min-nodes": m,
    }
    strategy = checked(reference, run)
    for server_round in range(1, rounds + 1):
        sent = list(strategy.configure_train(server_round, numpy_to_record(reference), ConfigRecord({}), Nodes(5)))
        assert len(sent) == m, "central DP samples exactly fed.min-nodes nodes (the accountant's sample size)"
        assert sent[0].content["config"]["clipping_norm"] == clip  # what fixedclipping_mod reads on the node
        arrays, _ = strategy.aggregate_train(server_round, _dp_replies(m, [dict(reference)] * m))
        assert np.std(record_to_numpy(arrays)["lora.w"]) == pytest.approx(z * clip / m, rel=0.01)
    spent = strategy.privacy_metrics(rounds, AppConfig.from_flat(run).dp)
    assert spent["dp-epsilon"] == pytest.approx(rdp_epsilon(z, rounds, 1e-5), rel=1e-9)
    assert spent["dp-releases"] == rounds


def test_a_resumed_run_charges_the_accountant_for_the_rounds_already_done():
    from fedrag_app.flower.strategies import build_strategy

    run = {"dp.mode": "server-clip", "dp.noise-multiplier": 1.5, "fed.min-nodes": 2}
    cfg = AppConfig.from_flat(run)
    strategy = build_strategy(cfg, {"lora.w": np.zeros(4, np.float32)}, None, rounds_done=4)
    assert strategy.privacy_metrics(4, cfg.dp)["dp-epsilon"] == pytest.approx(rdp_epsilon(1.5, 4, cfg.dp.delta))


def test_product_aggregation_refuses_central_dp_by_name():
    with pytest.raises(ConfigError, match="fed.lora-aggregation"):
        AppConfig.from_flat({"dp.mode": "client-clip", "fed.lora-aggregation": "product"})


# --- LoRA-aware aggregation in the app -----------------------------------------------------------------------------
def test_ffa_lora_sends_only_b_keeps_a_frozen_and_matches_the_servers_a(node):
    run = {**RALT, "fed.lora-aggregation": "ffa"}
    client_app._MODELS.clear()
    sent, out = client_round(run, node)
    keys = list(out.content["arrays"])
    assert keys and all(".lora_B." in k for k in keys), "FFA-LoRA sends the B factors only"
    gen, _ = client_app._models(AppConfig.from_flat(run))
    assert not any(p.requires_grad for n, p in gen.model.named_parameters() if ".lora_A." in n)
    cfg = AppConfig.from_flat(run)
    apply_runtime(cfg.runtime)  # the server's start: a fresh seeded load must give every node's A
    server_a = lora_a_fingerprint(load_generator(cfg.generator))
    assert out.content["checks"]["lora-a-fingerprint"] == server_a  # a value checked, not a metric averaged
    assert "lora-a-fingerprint" not in out.content["metrics"]
    strategy = checked(record_to_numpy(sent), run, a_fingerprint=server_a)
    arrays, _ = strategy.aggregate_train(1, [reply(out.content, 1)])
    assert arrays is not None
    other = RecordDict(
        {
            "arrays": out.content["arrays"],
            "metrics": metric_record({"num-examples": 4}),
            "checks": ConfigRecord({"lora-a-fingerprint": server_a + 1.0}),
        }
    )
    assert checked(record_to_numpy(sent), run, a_fingerprint=server_a).aggregate_train(1, [reply(other, 2)]) == (
        None,
        None,
    )


def test_product_aggregation_in_the_strategy_is_the_exact_mean_of_the_products():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 6)).astype(np.float32)  # a shared A: the mean of B_i A has rank <= 4, so exact
    states = [
        {
            "lora.m.lora_A.weight": a,
            "lora.m.lora_B.weight": rng.standard_normal((5, 4)).astype(np.float32),
            "retriever.v": np.full(3, float(i), np.float32),
        }
        for i in range(2)
    ]
    reference = {k: np.zeros_like(v) for k, v in states[0].items()}
    run = {"fed.lora-aggregation": "product", "generator.lora-r": 4, "generator.lora-alpha": 8}
    strategy = checked(reference, run)
    replies = [
        reply(RecordDict({"arrays": numpy_to_record(s), "metrics": metric_record({"num-examples": n})}), i)
        for i, (s, n) in enumerate(zip(states, (1, 3)))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    out = record_to_numpy(arrays)
    want = (1 * states[0]["lora.m.lora_B.weight"] @ a + 3 * states[1]["lora.m.lora_B.weight"] @ a) / 4
    assert np.allclose(out["lora.m.lora_B.weight"] @ out["lora.m.lora_A.weight"], want, atol=1e-4)
    assert np.allclose(out["retriever.v"], 0.75)
    assert list(out) == list(states[0]), "the aggregate keeps the replies' key order"
    assert strategy.round_costs["lora-svd-energy-lost-max"] == pytest.approx(0.0, abs=1e-10)


# --- personal adapters ---------------------------------------------------------------------------------------------
def test_a_personal_adapter_continues_only_in_its_own_federation(tmp_path):
    import torch

    from fedrag_app.federation.personal import RoundOf, load_personal, save_personal

    save_personal(tmp_path, {"x": torch.ones(2)}, RoundOf(run_id=5, server_round=2))
    assert load_personal(tmp_path, RoundOf(5, 3)) is not None, "the same run, its next round"
    assert load_personal(tmp_path, RoundOf(6, 1)) is None, "a new run on the same node starts fresh"
    assert load_personal(tmp_path, RoundOf(6, 3, round_offset=2)) is not None, "a run resumed after round 2"
    assert load_personal(tmp_path, RoundOf(6, 2, round_offset=1)) is None, "resumed from before it was written"


def test_a_run_resumed_after_a_lost_round_continues_the_adapter_of_the_round_it_resumes_from(tmp_path):
    """The node finished round 3, the server crashed before checkpointing it and resumes after round 2: round 3 is
    trained again from the node's round-2 adapter, not from the lost round 3's, nor from scratch."""
    import torch

    from fedrag_app.federation.personal import RoundOf, load_personal, save_personal

    for server_round in (1, 2, 3):
        save_personal(
            tmp_path, {"x": torch.full((2,), float(server_round))}, RoundOf(run_id=5, server_round=server_round)
        )
    assert len(list(tmp_path.iterdir())) == 2, "the last two rounds are kept"
    resumed = load_personal(tmp_path, RoundOf(run_id=6, server_round=3, round_offset=2))
    assert resumed is not None and torch.equal(resumed["x"], torch.full((2,), 2.0))
    evaluated = load_personal(tmp_path, RoundOf(run_id=5, server_round=3), training=False)
    assert torch.equal(evaluated["x"], torch.full((2,), 3.0)), "evaluating round 3 uses round 3's adapter"


def test_personal_adapter_trains_on_the_node_persists_and_never_appears_in_a_reply(node, tmp_path, monkeypatch):
    import torch

    from fedrag_app.federation import personal
    from fedrag_app.federation.personal import load_personal

    run = {**RALT, "fed.personal-adapter": True}
    here = {**node, "state-path": str(tmp_path / "state")}
    client_app._MODELS.clear()
    sent, first = client_round(run, here)
    saved = load_personal(tmp_path / "state")
    assert saved and any(".lora_B." in k and float(v.abs().sum()) > 0 for k, v in saved.items()), "B trained from 0"
    replied = record_to_numpy(first.content["arrays"])
    assert sorted(replied) == sorted(sent), "a reply carries the global adapter's keys only"
    for value in replied.values():
        assert not any(value.shape == p.shape and np.array_equal(value, p.numpy()) for p in saved.values())
    _, second = client_round(run, here, server_round=2)  # the same seed: only the saved start differs
    again = load_personal(tmp_path / "state")
    assert any(not torch.equal(saved[k], again[k]) for k in saved), "round 2 did not start from the saved adapter"
    started_from = []
    real_load = personal.load_personal
    monkeypatch.setattr(
        personal, "load_personal", lambda *a, **k: started_from.append(real_load(*a, **k)) or started_from[-1]
    )
    client_round(run, here, run_id=2)  # another federation on the same node
    assert started_from == [None], "a new run must not inherit the personal adapter of another run"
    content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})})
    scores = client_app.app(message(content, "evaluate"), context(here, run)).content["metrics"]
    assert {"client-wq-f1", "client-personal-wq-f1", "client-personal-wq-em"} <= set(scores)
    assert not list((tmp_path / "state").glob("*.tmp"))


# --- what leaves a node under DP (tiny models: the replies' contents, not the maths) --------------------------------
@pytest.fixture(scope="module")
def tiny_node(tmp_path_factory, template_shard):
    """An institution on the tiny models: 6 training questions, 2 held-out ones, a copy of the tiny shard."""
    import shutil

    from fedrag_app.data.loaders import load_web_questions, write_qa_jsonl

    folder = tmp_path_factory.mktemp("tiny-node")
    questions = load_web_questions("train", AppConfig().data)
    write_qa_jsonl(folder / "train.jsonl", questions[:6])
    write_qa_jsonl(folder / "heldout.jsonl", questions[6:8])
    shutil.copytree(template_shard, folder / "shard")
    yield {
        "partition-id": 0,
        "num-partitions": 1,
        "data-path": str(folder / "train.jsonl"),
        "heldout-path": str(folder / "heldout.jsonl"),
        "store-path": str(folder / "shard"),
    }
    client_app._MODELS.clear()


PRIVATE = {"num-examples", "ralt-loss-mean", "lsr-kl-mean", "local-seconds", "handler-seconds"}  # from its data


def _tiny_replies(run: dict, node: dict, clip: float):
    """A train and an evaluate reply of the real ClientApp, mods included."""
    sent, trained = client_round(run, node, clipping_norm=clip if run["dp.mode"] == "client-clip" else None)
    content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})})
    evaluated = client_app.app(message(content, "evaluate"), context(node, run))
    assert not evaluated.has_error(), evaluated.error
    return sent, trained, evaluated


@pytest.mark.parametrize("mode", ["off", "client-clip", "server-clip", "local"])
def test_under_dp_a_reply_carries_the_covered_weights_and_public_values_only(tiny_node, tiny_models_config, mode):
    from fedrag_app.federation.disclosure import PUBLIC

    clip = 1e-3
    run = {**TINY, **tiny_models_config, "dp.mode": mode, "dp.clipping-norm": clip}
    sent, trained, evaluated = _tiny_replies(run, tiny_node, clip)
    metrics, scores = dict(trained.content["metrics"]), dict(evaluated.content["metrics"])
    if mode == "off":  # what DP replaces: losses, counts, timings and held-out scores all travel
        assert PRIVATE <= set(metrics) and "client-wq-f1" in scores and "num-examples" in scores
        return
    assert set(metrics) <= PUBLIC and metrics["dp-weight"] == 1, f"private values left the node: {metrics}"
    assert set(trained.content.keys()) == {"arrays", "metrics"}, "nothing beside the weights and public values"
    assert scores == {"dp-weight": 1} and set(evaluated.content.keys()) == {"metrics"}
    assert sorted(trained.content["arrays"]) == sorted(sent)
    if mode == "client-clip":  # the weights are what the mechanism covers: clipped here, noised by the server
        assert _update_norm(trained.content["arrays"], sent) <= clip * 1.001


def test_a_node_that_opts_in_sends_its_values_apart_and_the_server_names_them(
    tiny_node, tiny_models_config, in_a_server_app, tmp_path, caplog
):
    """node-config dp-share-metrics = true: the un-noised values travel in their own record, never in the
    MetricRecord Flower averages, and the node logs it; the server averages them over the nodes that sent them
    and its metrics row names them as not DP-protected, beside a node that withheld them."""
    import logging

    from fedrag_app.evaluation.reporting import dp_label, plot_metrics
    from fedrag_app.federation.disclosure import UNPROTECTED

    clip = 1e-3
    run = {**TINY, **tiny_models_config, "dp.mode": "local", "dp.clipping-norm": clip, "fed.min-nodes": 2}
    caplog.set_level(logging.INFO)
    sent, shared_train, shared_eval = _tiny_replies(run, {**tiny_node, "dp-share-metrics": True}, clip)
    assert any("dp-share-metrics = true: sending un-noised" in r.getMessage() for r in caplog.records)
    shared = dict(shared_train.content[UNPROTECTED])
    assert PRIVATE <= set(shared) and not PRIVATE & set(shared_train.content["metrics"])
    assert "client-wq-f1" in shared_eval.content[UNPROTECTED]
    _, withheld_train, withheld_eval = _tiny_replies(run, tiny_node, clip)
    assert UNPROTECTED not in withheld_train.content

    strategy = checked(record_to_numpy(sent), run)
    list(strategy.configure_train(1, sent, ConfigRecord({}), Nodes(2)))
    arrays, _ = strategy.aggregate_train(1, [reply(shared_train.content, 1), reply(withheld_train.content, 2)])
    assert arrays is not None, "equal public weights: the two replies are averaged"
    assert strategy.last_train_metrics["ralt-loss-mean"] == pytest.approx(shared["ralt-loss-mean"])
    assert strategy.round_costs["round-local-seconds-max"] == pytest.approx(shared["local-seconds"])
    evaluations = [reply(c.content, i, message_type="evaluate") for i, c in ((1, shared_eval), (2, withheld_eval))]
    strategy.aggregate_evaluate(1, evaluations)
    row = strategy.privacy_metrics(1, AppConfig.from_flat(run).dp)
    assert row["dp-protected"] is True and row["dp-mode"] == "local"
    assert {"train-ralt-loss-mean", "train-num-examples", "client-wq-f1"} <= set(row["dp-unprotected"])
    assert row["dp-unprotected-nodes-train"] == row["dp-unprotected-nodes-evaluate"] == 1
    assert any("NOT DP-protected" in r.getMessage() and "client-wq-f1" in r.getMessage() for r in caplog.records)
    rows = [{"round": 1, **row, **{f"train-{k}": v for k, v in strategy.last_train_metrics.items()}}]
    assert dp_label("ralt-loss-mean", rows) == "ralt-loss-mean (not DP-protected)"
    assert dp_label("wq-f1", rows) == "wq-f1", "the server's evaluation of DP-protected weights"
    plot_metrics(rows, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").stat().st_size > 0
