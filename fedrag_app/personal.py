"""A node's personal adapter on its own disk: read at the start of each message, written after a successful
local round (atomically: write a temp file, then rename). It never enters a reply; see client_app.py.

The file records the Flower run and the round that wrote it, and a run only continues an adapter of its own or,
when it resumes (round-offset > 0), one written at or before the round it resumes from. A new federation on the
same node therefore starts a fresh personal adapter instead of inheriting another run's.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedrag_app.config import AppConfig
from fedrag_app.generator import PERSONAL, Generator, attach_personal_adapter, detach_personal_adapter, lora_state_dict

FILE = "personal-adapter.safetensors"


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundOf:
    """Which federation and round a message belongs to: the Flower run, the absolute round, the rounds done
    before this run (a resumed run's offset)."""

    run_id: int
    server_round: int
    round_offset: int = 0

    def continues(self, run_id: int, written_round: int) -> bool:
        return run_id == self.run_id or 0 < written_round <= self.round_offset


def load_personal(state_dir: Path, at: RoundOf | None = None) -> dict[str, torch.Tensor] | None:
    """The node's personal adapter from earlier rounds of this federation (``at``; None = whatever is on disk),
    or None before its first round."""
    path = Path(state_dir) / FILE
    if not path.exists():
        return None
    if at is not None:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        run_id, written = int(meta.get("run-id", -1)), int(meta.get("server-round", 0))
        if not at.continues(run_id, written):
            log.warning("%s was written by run %s at round %s, not by this federation (run %s, resumed after round "
                        "%s): starting a fresh personal adapter", path, run_id, written, at.run_id, at.round_offset)
            return None
    return load_file(str(path))


def save_personal(state_dir: Path, state: dict[str, torch.Tensor], at: RoundOf) -> None:
    path = Path(state_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
              metadata={"run-id": str(at.run_id), "server-round": str(at.server_round)})
    os.replace(tmp, path)


@contextmanager
def personal_adapter(cfg: AppConfig, gen: Generator, state_dir: Path, partition_id: int, at: RoundOf, *,
                     keep: bool) -> Iterator[None]:
    """With fed.personal-adapter, the node's own adapter is stacked on the global one for the duration of the
    block; ``keep`` writes it back after the block succeeds (a failed round leaves the previous one in place)."""
    if not cfg.fed.personal_adapter:
        yield
        return
    attach_personal_adapter(gen, cfg.generator, load_personal(state_dir, at),
                            seed=cfg.runtime.seed + 7919 * (partition_id + 1))
    try:
        yield
        if keep:
            save_personal(state_dir, lora_state_dict(gen, PERSONAL), at)
    finally:
        detach_personal_adapter(gen)
