"""LoRA-aware aggregation against exact references on random factors and on the real adapter's shapes."""

import numpy as np
import pytest
import torch

from fedrag_app.federation.lora_aggregation import (
    lora_pairs,
    product_average,
    weighted_mean,
)
from fedrag_app.rag.generator import load_lora_state_dict, lora_state_dict

rng = np.random.default_rng(0)
OUT, IN = 12, 10


def adapter(rank: int, a: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {
        "m.q_proj.lora_A.weight": a if a is not None else rng.normal(size=(rank, IN)).astype(np.float32),
        "m.q_proj.lora_B.weight": rng.normal(size=(OUT, rank)).astype(np.float32),
    }


def product(state, scale=1.0):
    return (
        scale * state["m.q_proj.lora_B.weight"].astype(np.float64) @ state["m.q_proj.lora_A.weight"].astype(np.float64)
    )


def test_plain_fedavg_of_factors_is_not_the_mean_of_products():
    s1, s2 = adapter(2), adapter(2)
    avg = weighted_mean([s1, s2], [1, 1])
    assert not np.allclose(product(avg), (product(s1) + product(s2)) / 2, atol=1e-3)


def test_ffa_lora_mean_of_b_with_shared_a_is_the_exact_mean_of_products():
    shared_a = rng.normal(size=(2, IN)).astype(np.float32)
    clients = [adapter(2, shared_a) for _ in range(3)]
    weights = [10, 30, 60]
    avg = weighted_mean(clients, weights)
    exact = sum(w * product(c) for w, c in zip(np.array(weights) / 100, clients))
    np.testing.assert_allclose(product(avg), exact, atol=1e-5)
    np.testing.assert_array_equal(avg["m.q_proj.lora_A.weight"], shared_a)


def test_product_average_of_mixed_ranks_uses_each_clients_scale():
    clients, alpha = [adapter(2), adapter(4)], 16
    merged, report = product_average(clients, [1, 1], rank=6, alpha=alpha)
    exact = 0.5 * product(clients[0], alpha / 2) + 0.5 * product(clients[1], alpha / 4)
    np.testing.assert_allclose(product(merged, alpha / 6), exact, atol=1e-4)
    assert report["svd-energy-lost-max"] < 1e-10


def test_product_average_is_exact_when_the_rank_allows_it():
    clients, weights, alpha = [adapter(2), adapter(2)], [1, 3], 16
    merged, report = product_average(clients, weights, rank=4, alpha=alpha)
    exact = 0.25 * product(clients[0], alpha / 2) + 0.75 * product(clients[1], alpha / 2)
    np.testing.assert_allclose(product(merged, alpha / 4), exact, atol=1e-4)
    assert report["svd-energy-lost-max"] < 1e-10


def test_product_average_reports_the_energy_lost_to_truncation():
    clients, alpha = [adapter(2), adapter(2)], 16
    merged, report = product_average(clients, [1, 1], rank=2, alpha=alpha)
    exact = 0.5 * product(clients[0], alpha / 2) + 0.5 * product(clients[1], alpha / 2)
    s = np.linalg.svd(exact, compute_uv=False)
    assert report["svd-energy-lost-max"] == pytest.approx((s[2:] ** 2).sum() / (s**2).sum(), rel=1e-6)
    assert merged["m.q_proj.lora_A.weight"].shape == (2, IN) and merged["m.q_proj.lora_B.weight"].shape == (OUT, 2)


def test_product_average_yields_a_valid_adapter_for_the_real_model(generator):
    original = lora_state_dict(generator)
    states = [{k: (v + 0.01 * torch.randn_like(v)).numpy() for k, v in original.items()} for _ in range(2)]
    assert len(lora_pairs(states[0])) == 60
    merged, report = product_average(states, [1, 2], rank=8, alpha=16)
    losses = []
    for pair in lora_pairs(states[0]).values():  # the best rank-8 approximation of the exact weighted mean of B_i A_i
        exact = sum(
            w * s[pair.b_key].astype(np.float64) @ s[pair.a_key].astype(np.float64)
            for w, s in zip((1 / 3, 2 / 3), states)
        )
        u, sv, vt = np.linalg.svd(exact, full_matrices=False)
        got = merged[pair.b_key].astype(np.float64) @ merged[pair.a_key].astype(np.float64)
        np.testing.assert_allclose(got, (u[:, :8] * sv[:8]) @ vt[:8], atol=1e-5)
        losses.append((sv[8:] ** 2).sum() / (sv**2).sum())
    assert report["svd-energy-lost-max"] == pytest.approx(max(losses), rel=1e-4)
    try:
        load_lora_state_dict(generator, {k: torch.from_numpy(v) for k, v in merged.items()})
        loaded = lora_state_dict(generator)
        assert all(torch.equal(loaded[k], torch.from_numpy(merged[k])) for k in merged), "the model holds the average"
    finally:
        load_lora_state_dict(generator, original)
