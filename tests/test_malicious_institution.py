"""One malicious institution of five, every round of three: it sends its update scaled x1000, or sign-flipped.
FedAvg lets it move the global model; the median, the trimmed mean and (against scaling) the update-norm bound
keep the held-out loss within 10% of the all-honest run. Real strategies, real ClientApp rounds on the tiny
models (tests/malicious_federation.py); the figures are in docs/ROBUSTNESS.md."""

from __future__ import annotations

import pytest

from tests.malicious_federation import ATTACKS, federation

ROBUST = {
    "fedmedian": {"fed.strategy": "fedmedian"},
    "fedtrimmedavg": {"fed.strategy": "fedtrimmedavg"},  # beta 0.2 of 5 nodes: one cut from each tail
}


@pytest.fixture(scope="module")
def fed(tmp_path_factory, template_shard, tiny_models_config):
    from flwr.supercore.task_identity import TaskIdentity

    from fedrag_app.flower import client_app

    with pytest.MonkeyPatch.context() as mp:  # the strategy builds its Messages as inside a ServerApp
        mp.setattr(TaskIdentity, "_run_id", 1)
        mp.setattr(TaskIdentity, "_node_id", 0)
        mp.setattr(TaskIdentity, "_task_id", 1)
        yield federation(tmp_path_factory.mktemp("malicious"), template_shard, tiny_models_config)
    client_app._MODELS.clear()


@pytest.fixture(scope="module")
def honest(fed) -> float:
    """The held-out loss after three all-honest FedAvg rounds, and a check that they learnt something."""
    before, after = fed.heldout_loss(fed.initial), fed.train({})
    assert after < 0.9 * before, f"honest training should lower the held-out loss: {before:.3f} -> {after:.3f}"
    return after


def test_fedavg_is_moved_far_by_one_scaled_update(fed, honest):
    loss = fed.train({}, ATTACKS["scaled"])
    assert loss > 10 * honest, f"FedAvg with one x1000 node: {loss:.3f} against {honest:.3f} all-honest"


def test_fedavg_is_set_back_by_one_sign_flipped_update(fed, honest):
    """A flip keeps an honest length: it cancels one node's progress and more, not a blow-up (docs/ROBUSTNESS.md)."""
    loss = fed.train({}, ATTACKS["sign-flipped"])
    assert loss > 1.05 * honest, f"FedAvg with one sign-flipped node: {loss:.3f} against {honest:.3f} all-honest"


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("strategy", sorted(ROBUST))
def test_a_robust_strategy_keeps_the_held_out_loss_within_ten_percent(fed, honest, strategy, attack):
    loss = fed.train(ROBUST[strategy], ATTACKS[attack])
    assert loss < 1.1 * honest, f"{strategy}, one {attack} node: {loss:.3f} against {honest:.3f} all-honest FedAvg"


def test_the_update_norm_bound_keeps_fedavg_within_ten_percent_of_a_scaled_update(fed, honest):
    loss = fed.train({"fed.update-norm-bound": 2.0}, ATTACKS["scaled"])
    assert loss < 1.1 * honest, f"FedAvg, norm bound 2x median, one x1000 node: {loss:.3f} against {honest:.3f}"
