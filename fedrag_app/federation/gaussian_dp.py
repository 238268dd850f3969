"""The Gaussian mechanism's exact privacy curve: local DP's noise, and its epsilon over rounds. Plain floats, no Flower.

A Gaussian mechanism of L2 sensitivity Δ and noise std σ is exactly μ-GDP with μ = Δ/σ: its tightest (ε, δ) pairs
are δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ) (Balle & Wang 2018, Theorem 8; Dong, Roth & Su 2019, Corollary 2.13).

- ``gaussian_sigma``: the smallest σ with δ(ε) ≤ δ, by bisection on the equation of Balle & Wang's Algorithm 1. The
  classic σ = Δ·√(2 ln(1.25/δ))/ε (Flower's LocalDpMod) is proven for ε < 1 only and at δ = 1e-5 is too small above
  ε ≈ 8.5 (true δ 3.4e-4 at ε = 16); this one holds for every ε and adds no more noise than needed.
- ``composed_epsilon``: R adaptive releases of noise multiplier z = σ/Δ are exactly one release of z/√R
  (μ_R = √R·μ; Dong, Roth & Su, Corollary 3.3), so ε after R rounds is where that curve reaches δ: the exact value
  (a PRV accountant's limit for Gaussian releases), which RDP only bounds from above (tests check both).
"""

from __future__ import annotations

import math

_SQRT2 = math.sqrt(2.0)


def _log_cdf(x: float) -> float:
    """log Φ(x); below −30 (erfc underflows near −38) the asymptotic series, relative error < 1e-10."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / _SQRT2))
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log1p(-(x**-2) + 3 * x**-4 - 15 * x**-6)


def gdp_delta(epsilon: float, mu: float) -> float:
    """The exact δ at ``epsilon`` of a μ-GDP mechanism (a Gaussian mechanism with Δ/σ = μ), in log space so a large
    ε or μ neither overflows e^ε nor underflows Φ."""
    assert epsilon >= 0 and mu > 0, f"epsilon = {epsilon} must be >= 0 and mu = {mu} > 0"
    hi = math.exp(_log_cdf(mu / 2 - epsilon / mu))
    lo = math.exp(epsilon + _log_cdf(-mu / 2 - epsilon / mu))
    return max(0.0, hi - lo)


def _bisect(ok, hi: float) -> float:
    """The boundary of a predicate that holds above it, returned on its ``ok`` side to a relative 1e-12: ``hi`` is
    doubled until ``ok`` holds, the bracket halved down until it fails, then bisected."""
    while not ok(hi):
        hi *= 2.0
    lo = hi / 2.0
    while ok(lo) and lo > 1e-300:
        hi, lo = lo, lo / 2.0
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest noise std (to a relative 1e-12, rounded up) that makes a Gaussian mechanism of this L2
    sensitivity (ε, δ)-DP: the analytic Gaussian mechanism (Balle & Wang 2018, Algorithm 1)."""
    assert epsilon > 0 and 0 < delta < 1 and sensitivity > 0, f"epsilon={epsilon}, delta={delta}, Δ={sensitivity}"
    return _bisect(lambda sigma: gdp_delta(epsilon, sensitivity / sigma) <= delta, sensitivity)


def local_dp_sigma(clipping_norm: float, epsilon: float, delta: float) -> float:
    """Local DP's noise std per round: sensitivity 2C, since swapping a node's whole dataset can move its clipped
    update anywhere in the ball of radius C, so two releases differ by up to 2C."""
    return gaussian_sigma(epsilon, delta, 2.0 * clipping_norm)


def composed_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` adaptive releases of a Gaussian mechanism with σ/Δ = ``noise_multiplier``:
    exact (μ-GDP composition), so one round gives back the ε the noise was calibrated for."""
    assert noise_multiplier > 0 and 0 < delta < 1, f"noise_multiplier={noise_multiplier}, delta={delta}"
    if rounds <= 0:
        return 0.0
    mu = math.sqrt(rounds) / noise_multiplier
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    return _bisect(lambda eps: gdp_delta(eps, mu) <= delta, 1.0)
