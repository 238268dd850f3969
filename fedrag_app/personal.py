"""A node's personal adapter on its own disk: read at the start of each message, written after a successful
local round (atomically: write a temp file, then rename). It never enters a reply; see client_app.py."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from fedrag_app.config import AppConfig
from fedrag_app.generator import PERSONAL, Generator, attach_personal_adapter, detach_personal_adapter, lora_state_dict

FILE = "personal-adapter.safetensors"


def load_personal(state_dir: Path) -> dict[str, torch.Tensor] | None:
    """The node's personal adapter from earlier rounds, or None before its first round."""
    path = Path(state_dir) / FILE
    return load_file(str(path)) if path.exists() else None


def save_personal(state_dir: Path, state: dict[str, torch.Tensor]) -> None:
    path = Path(state_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


@contextmanager
def personal_adapter(cfg: AppConfig, gen: Generator, state_dir: Path, partition_id: int, *, keep: bool) -> Iterator[None]:
    """With fed.personal-adapter, the node's own adapter is stacked on the global one for the duration of the
    block; ``keep`` writes it back after the block succeeds (a failed round leaves the previous one in place)."""
    if not cfg.fed.personal_adapter:
        yield
        return
    attach_personal_adapter(gen, cfg.generator, load_personal(state_dir),
                            seed=cfg.runtime.seed + 7919 * (partition_id + 1))
    try:
        yield
        if keep:
            save_personal(state_dir, lora_state_dict(gen, PERSONAL))
    finally:
        detach_personal_adapter(gen)
