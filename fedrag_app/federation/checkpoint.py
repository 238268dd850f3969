"""Per-round checkpoints: what users load (PEFT adapter, sentence-transformers retriever) plus round metadata.

<output>/round-<n>/{adapter/, retriever/, state.json}, plus server-optimizer.safetensors under a server optimizer
(fed.strategy: its momentum or moments, so a resumed run continues them). Each round folder is written into a temp
sibling and renamed into place whole (core.atomic), so a crash mid-save leaves the previous checkpoints intact and
no half-written one; resume picks the highest round whose state.json says it is complete.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrag_app.core.atomic import atomic_dir
from fedrag_app.core.errors import CheckpointError
from fedrag_app.rag.generator import Generator, load_lora_state_dict, save_adapter
from fedrag_app.rag.retriever import DualEncoder, load_retriever

_ROUND_DIR = re.compile(r"^round-(\d+)$")
SERVER_STATE = "server-optimizer.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    round: int
    path: Path

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def retriever_dir(self) -> Path:
        return self.path / "retriever"


def save_checkpoint(
    out_dir: str | Path,
    server_round: int,
    gen: Generator,
    retriever: DualEncoder,
    metrics: dict[str, float],
    config: dict,
    server_state: dict | None = None,
) -> Checkpoint:
    """Write round-<n> atomically; an existing round-<n> is replaced whole. ``server_state``: the server
    optimizer's numpy arrays (strategies.ServerOptimizer.optimizer_state)."""
    target = Path(out_dir) / f"round-{server_round:04d}"
    with atomic_dir(target) as tmp:
        save_adapter(gen, tmp / "adapter")
        retriever.save(tmp / "retriever")
        state = {"round": server_round, "complete": True, "saved-at": time.time(), "metrics": metrics, "config": config}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        if server_state:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in server_state.items()}, str(tmp / SERVER_STATE))
    return Checkpoint(server_round, target)


def load_server_state(ckpt: Checkpoint) -> dict:
    """The server optimizer's arrays saved with a checkpoint; {} when it has none (FedAvg, or an older one)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = ckpt.path / SERVER_STATE
    try:
        return load_file(str(path)) if path.exists() else {}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


def latest_checkpoint(out_dir: str | Path) -> Checkpoint | None:
    """The highest complete round under ``out_dir``, or None."""
    best = None
    for folder in Path(out_dir).glob("round-*"):
        match = _ROUND_DIR.match(folder.name)
        state_file = folder / "state.json"
        if not match or not state_file.exists():
            continue
        try:
            state = json.loads(state_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{state_file}: unreadable ({e})") from e
        if state.get("complete") and (best is None or state["round"] > best.round):
            best = Checkpoint(int(state["round"]), folder)
    return best


def load_checkpoint(ckpt: Checkpoint, gen: Generator, retriever: DualEncoder) -> None:
    """Set the generator's adapter and the retriever's trainable weights from a checkpoint."""
    from peft.utils import load_peft_weights

    try:
        adapter = load_peft_weights(str(ckpt.adapter_dir), device="cpu")
        saved = load_retriever(_retriever_config(retriever), path=str(ckpt.retriever_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt.path} cannot be loaded: {e}") from e
    load_lora_state_dict(gen, adapter)
    full = saved.trainable_state_dict()
    wanted = retriever.trainable_state_dict()
    missing = sorted(set(wanted) - set(full))
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.path} lacks retriever weights {missing[:3]}")
    retriever.load_trainable_state_dict({k: full[k] for k in wanted})


def _retriever_config(retriever: DualEncoder):
    from fedrag_app.config.app_config import RetrieverConfig

    return RetrieverConfig(train_top_layers=0, train_context_encoder=retriever.train_context)
