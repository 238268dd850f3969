"""Local DP on a node's train reply: Flower's own clipping, noise from the analytic Gaussian mechanism.

Flower's LocalDpMod draws noise of std Δ·√(2 ln(1.25/δ))/ε, the classic bound that fails above ε ≈ 8.5 at δ = 1e-5.
This mod keeps LocalDpMod's contract (one ArrayRecord in and out, reply keys in the order received, the update
clipped to C against what was received, by Flower's compute_clip_model_update) and replaces only σ, by the smallest
one the exact curve allows (federation/gaussian_dp.py). The noise comes from a generator seeded by OS entropy, not
numpy's global one, which runtime.seed seeds for training: noise anyone knowing the seed could subtract protects
nothing.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import compute_clip_model_update

from fedrag_app.federation.gaussian_dp import gaussian_sigma


class AnalyticLocalDpMod:
    """Clip a train reply's update to ``clipping_norm`` and add N(0, σ²) to every weight, σ calibrated by the analytic
    Gaussian mechanism for (``epsilon``, ``delta``) at L2 ``sensitivity``."""

    def __init__(self, clipping_norm: float, sensitivity: float, epsilon: float, delta: float):
        self.clipping_norm = clipping_norm
        self.sigma = gaussian_sigma(epsilon, delta, sensitivity)

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        if len(msg.content.array_records) != 1:
            return _refused(msg, f"expects one ArrayRecord in the message, got {len(msg.content.array_records)}")
        received = next(iter(msg.content.array_records.values()))
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if len(reply.content.array_records) != 1:
            return _refused(msg, f"expects one ArrayRecord in the reply, got {len(reply.content.array_records)}")
        key, record = next(iter(reply.content.array_records.items()))
        if list(record.keys()) != list(received.keys()):
            return _refused(msg, "expects the reply's array keys, in order, to be those the node received")
        arrays = record.to_numpy_ndarrays()
        compute_clip_model_update(arrays, received.to_numpy_ndarrays(), self.clipping_norm)  # in place
        rng = np.random.default_rng()  # OS entropy
        noised = [a + rng.normal(0.0, self.sigma, a.shape).astype(a.dtype) for a in arrays]
        reply.content[key] = ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in zip(record.keys(), noised)})
        log(INFO, "local DP: update clipped to %.4g, Gaussian noise of std %.6g added", self.clipping_norm, self.sigma)
        return reply


def _refused(msg: Message, why: str) -> Message:
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"AnalyticLocalDpMod {why}"), reply_to=msg)
