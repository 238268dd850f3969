"""A node's AdamW state carried across rounds (train.keep-optimizer-state), as plain named tensors and step counts.

Without it every round starts a fresh AdamW, whose first steps are sign-like (m / sqrt(v) = ±1). With it, round
t + 1 continues the moments and the bias correction of round t, as one optimizer over all rounds would. The
ClientApp keeps the state in the node's own Flower context.state (records.py converts it), never in a reply;
centralized training keeps it in memory. Layout: "<parameter index>.<entry>" -> tensor (exp_avg, exp_avg_sq)
or int (step), the parameter index being the position in the optimizer's parameter list.
"""

from __future__ import annotations

import torch

OptimizerState = dict[str, "torch.Tensor | int"]


def restore_optimizer(optimizer: torch.optim.Optimizer, state: OptimizerState | None) -> None:
    """Continue ``optimizer`` from ``state`` (None or empty: leave it fresh). Only moments and steps load: the
    learning rate and betas stay the configured ones."""
    if not state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    entries: dict[int, dict] = {}
    for key, value in state.items():
        index, _, name = key.partition(".")
        entries.setdefault(int(index), {})[name] = torch.tensor(float(value)) if name == "step" else value
    for index, entry in entries.items():
        shapes = {tuple(v.shape) for n, v in entry.items() if n != "step"}
        if index >= len(params) or shapes != {tuple(params[index].shape)}:
            raise ValueError(
                f"kept optimizer state of parameter {index} {sorted(shapes)} does not fit this model "
                f"({len(params)} trainable parameters)"
            )
    full = optimizer.state_dict()
    full["state"] = entries
    optimizer.load_state_dict(full)


def keep_optimizer(optimizer: torch.optim.Optimizer, state: OptimizerState | None) -> None:
    """Replace ``state``'s contents by ``optimizer``'s (None: nothing is kept)."""
    if state is None:
        return
    state.clear()
    for index, entry in optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            state[f"{index}.{name}"] = int(value.item()) if name == "step" else value.detach()
