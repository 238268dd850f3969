"""Tensor-only checks and averaging of client updates (numpy; no Flower), used by the ServerApp's strategy.

A reply whose weights cannot be averaged (NaN/Inf, missing or extra keys, wrong shapes) is refused with a
reason, never averaged in. Plain FedAvg is Flower's own; LoRA-aware variants live in lora_aggregation.py.
"""

from __future__ import annotations

import numpy as np

State = dict[str, np.ndarray]


def check_update(state: State, reference: State) -> str | None:
    """Why an update cannot be used (keys, shapes, non-finite values), or None if it can."""
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or unexpected:
        return f"keys differ: missing {missing[:2]}, unexpected {unexpected[:2]}"
    for key, ref in reference.items():
        if state[key].shape != ref.shape:
            return f"'{key}' has shape {state[key].shape}, expected {ref.shape}"
        if not np.isfinite(state[key]).all():
            return f"'{key}' holds NaN or Inf"
    return None
