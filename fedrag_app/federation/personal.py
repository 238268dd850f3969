"""A node's personal adapter on its own disk: read at the start of each message, written after a successful
local round (atomically and fsynced: core.atomic). It never enters a reply; see client_app.py.

One file per round, the last two kept: a node may finish round n+1 before the server crashes without checkpointing
it; the resumed server sends round n+1 again, and the node must start from its round-n adapter, not round n+1's.

The file records the Flower run and the round that wrote it, and a run only continues an adapter of its own or,
when it resumes (round-offset > 0), one written at or before the round it resumes from. A new federation on the
same node therefore starts a fresh personal adapter instead of inheriting another run's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.atomic import atomic_path
from fedrag_app.rag.generator import (
    PERSONAL,
    Generator,
    attach_personal_adapter,
    detach_personal_adapter,
    lora_state_dict,
)

PATTERN = re.compile(r"personal-adapter-round-(\d+)\.safetensors")


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


def _saved(state_dir: Path) -> dict[int, Path]:
    """Round written -> file, for the adapters on disk."""
    folder = Path(state_dir)
    found = (PATTERN.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
    return {int(m.group(1)): folder / m.group(0) for m in found if m}


def load_personal(
    state_dir: Path, at: RoundOf | None = None, *, training: bool = True
) -> dict[str, torch.Tensor] | None:
    """The node's personal adapter from earlier rounds of this federation (``at``; None = the newest on disk), or
    None before its first round. Training round n starts from the adapter of round n − 1 (one written at round n
    belongs to a round the server lost); evaluating round n uses round n's."""
    saved = _saved(state_dir)
    if at is None:
        return load_file(str(saved[max(saved)])) if saved else None
    usable = [r for r in saved if r <= at.server_round - int(training)]
    if not usable:
        return None
    path = saved[max(usable)]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    run_id, written = int(meta.get("run-id", -1)), int(meta.get("server-round", 0))
    if not at.continues(run_id, written):
        log.warning(
            "%s was written by run %s at round %s, not by this federation (run %s, resumed after round "
            "%s): starting a fresh personal adapter",
            path,
            run_id,
            written,
            at.run_id,
            at.round_offset,
        )
        return None
    return load_file(str(path))


def save_personal(state_dir: Path, state: dict[str, torch.Tensor], at: RoundOf) -> None:
    """Round ``at``'s adapter; keeps it and the previous round's, drops the others (older ones, and later ones:
    left by a lost round or another run)."""
    path = Path(state_dir) / f"personal-adapter-round-{at.server_round}.safetensors"
    with atomic_path(path) as tmp:  # fsynced: a crash never costs the node its adapter
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(tmp),
            metadata={"run-id": str(at.run_id), "server-round": str(at.server_round)},
        )
    for written, old in _saved(state_dir).items():
        if written not in (at.server_round, at.server_round - 1):
            old.unlink(missing_ok=True)


@contextmanager
def personal_adapter(
    cfg: AppConfig, gen: Generator, state_dir: Path, partition_id: int, at: RoundOf, *, keep: bool
) -> Iterator[None]:
    """With fed.personal-adapter, the node's own adapter is stacked on the global one for the duration of the
    block; ``keep`` writes it back after the block succeeds (a failed round leaves the previous one in place)."""
    if not cfg.fed.personal_adapter:
        yield
        return
    attach_personal_adapter(
        gen,
        cfg.generator,
        load_personal(state_dir, at, training=keep),
        seed=cfg.runtime.seed + 7919 * (partition_id + 1),
    )
    try:
        yield
        if keep:
            save_personal(state_dir, lora_state_dict(gen, PERSONAL), at)
    finally:
        detach_personal_adapter(gen)
