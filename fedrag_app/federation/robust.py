"""The update-norm bound (fed.update-norm-bound): one malicious node's update clipped before any strategy averages it.

A node's update is what it sends minus the round's global weights, every array together (the LoRA adapter and the
retriever's weights in one L2 norm). Each update whose norm exceeds ``multiple`` x the round's median update norm is
scaled down onto that bound; its direction is kept. With fewer than half the nodes malicious the median is an honest
node's norm, so a scaled (x1000) update counts at most ``multiple`` honest updates' length. A sign-flipped update
keeps an honest length and passes: that takes a robust aggregate (docs/ROBUSTNESS.md). Plain numpy, no Flower: the
server's strategy (flower/checked_strategy.py) applies it to the replies.
"""

from __future__ import annotations

import numpy as np

State = dict[str, np.ndarray]


def update_norms(states: list[State], sent: State) -> np.ndarray:
    """(n,) the L2 norm of each state's update (state - sent) over all its arrays, computed in float64."""
    return np.array(
        [
            np.sqrt(sum(float(np.sum((s[k].astype(np.float64) - sent[k].astype(np.float64)) ** 2)) for k in s))
            for s in states
        ]
    )


def bound_update_norms(
    states: list[State], sent: State, multiple: float
) -> tuple[list[State], np.ndarray, dict[str, float]]:
    """Each state moved onto sent + u * min(1, bound / |u|), bound = ``multiple`` x the median |u| of the round, in
    its own dtypes (a state within the bound is returned as is); the update norms before clipping; and the round's
    figures: the median, the bound, the largest norm, how many were clipped."""
    assert multiple >= 1.0, f"the bound is a multiple >= 1 of the median update norm, got {multiple}"
    norms = update_norms(states, sent)  # (n,)
    median = float(np.median(norms)) if len(norms) else 0.0
    bound = multiple * median
    bounded = []
    for state, norm in zip(states, norms):
        if norm <= bound:
            bounded.append(state)
            continue
        scale = bound / norm  # 0 when the median update is 0: nobody else moved, so neither does this one
        bounded.append(
            {
                k: (sent[k].astype(np.float64) + scale * (v.astype(np.float64) - sent[k].astype(np.float64))).astype(
                    v.dtype
                )
                for k, v in state.items()
            }
        )
    return (
        bounded,
        norms,
        {
            "update-norm-median": median,
            "update-norm-max": float(norms.max(initial=0.0)),
            "update-norm-bound": bound,
            "updates-clipped": float(np.sum(norms > bound)),
        },
    )
