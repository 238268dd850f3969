"""`fedrag-app export`: what a user serves after training, in folders other tools load without this package.

<out>/generator         the base LM with the global LoRA adapter merged in (PEFT merge_and_unload): a plain
                        transformers folder (AutoModelForCausalLM, vLLM)
<out>/retriever         the trained query encoder: a sentence-transformers folder (encode questions with it)
<out>/context-encoder   the encoder that embedded the store's passages (unchanged unless LSR trained it)
<out>/manifest.json     which checkpoint, base models, store and embedding fingerprint

Written into a temp sibling and renamed whole (atomic_dir): a crash never leaves a half-written export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedrag_app.config.app_config import AppConfig, all_keys
from fedrag_app.core.atomic import atomic_dir
from fedrag_app.core.errors import CheckpointError, ConfigError
from fedrag_app.federation.checkpoint import latest_checkpoint

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint folder holding adapter/ and retriever/, the run-config that produced it, and its metrics."""

    path: Path
    config: dict
    round: int | None
    metrics: dict


def find_source(path: str | Path) -> Source:
    """A round folder (state.json), a `fedrag-app train` output (config.json), or a federated output folder
    (its latest complete round)."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(
            f"--checkpoint {path}: no such folder (give a round-NNNN folder, a federated output "
            "folder or a `fedrag-app train` output)"
        )
    if not (path / "adapter").is_dir() and (latest := latest_checkpoint(path)) is not None:
        path = latest.path
    missing = [p for p in ("adapter/adapter_config.json", "retriever/dual_encoder.json") if not (path / p).exists()]
    if missing:
        raise CheckpointError(
            f"--checkpoint {path} lacks {', '.join(missing)}: not a checkpoint of this app "
            "(give a round-NNNN folder, a federated output folder or a `fedrag-app train` output)"
        )
    if (path / "state.json").exists():
        state = _read_json(path / "state.json")
        if not state.get("complete"):
            raise CheckpointError(f"--checkpoint {path}: its state.json does not say complete (an interrupted save)")
        return Source(path, state.get("config", {}), int(state["round"]), state.get("metrics", {}))
    config = _read_json(path / "config.json") if (path / "config.json").exists() else {}
    rows = (
        [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if (path / "metrics.jsonl").exists()
        else []
    )
    return Source(path, config, None, rows[-1] if rows else {})


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, *, overwrite: bool = False, overrides: Mapping[str, Any] | None = None
) -> dict:
    """Write the export (see the module docstring); returns its manifest. The checkpoint's run-config applies, with
    ``overrides`` (run-config keys: the CLI's --config/--set) on top, e.g. where the base model lives here."""
    from fedrag_app.rag.generator import load_generator

    src = find_source(checkpoint)
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty: choose another folder or pass --force to replace it")
    known = set(all_keys())
    kept = {k: v for k, v in src.config.items() if k in known}
    source = f"{src.path} config" + (" + --config/--set" if overrides else "")
    cfg = AppConfig.from_flat({**kept, **(overrides or {})}, source=source)
    # Merged into full-precision weights: a 4/8-bit base would round the adapter's update away.
    gen_cfg = dataclasses.replace(cfg.generator, quantization="none", adapter_path="")
    gen = load_generator(gen_cfg, adapter_path=str(src.path / "adapter"))
    merged = gen.model.merge_and_unload()
    retriever_meta = _read_json(src.path / "retriever" / "dual_encoder.json")
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp / "generator", safe_serialization=True)
        gen.tokenizer.save_pretrained(tmp / "generator")
        shutil.copytree(src.path / "retriever" / "query", tmp / "retriever")
        shutil.copytree(src.path / "retriever" / "context", tmp / "context-encoder")
        manifest = _manifest(src, cfg, retriever_meta, fingerprint=_weights_sha256(tmp / "context-encoder"))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _manifest(src: Source, cfg: AppConfig, retriever_meta: dict, *, fingerprint: str) -> dict:
    from fedrag_app.rag.model_sources import resolve_generator
    from fedrag_app.rag.store_location import store_location

    adapter_cfg = _read_json(src.path / "adapter" / "adapter_config.json")
    return {
        "created-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": str(src.path),
        "round": src.round,
        "train-mode": cfg.train.mode,
        "metrics": src.metrics,
        "generator": {
            "folder": "generator",
            "base-model": cfg.generator.model,
            "base-model-source": resolve_generator(cfg.generator.model),
            "adapter": str(src.path / "adapter"),
            "lora-r": adapter_cfg.get("r"),
            "lora-alpha": adapter_cfg.get("lora_alpha"),
            "lora-target-modules": sorted(adapter_cfg.get("target_modules") or []),
            "merged": True,
            "dtype": "float32",
        },
        "retriever": {
            "folder": "retriever",
            "role": "query encoder: encode questions with it",
            "base-model": cfg.retriever.model,
        },
        "context-encoder": {
            "folder": "context-encoder",
            "model": retriever_meta.get("name"),
            "dim": retriever_meta.get("dim"),
            "trained": cfg.retriever.train_context_encoder,
            "role": "embedded the store's passages: re-embed a corpus with it for the query encoder",
        },
        "embedding-fingerprint": {"sha256-of-context-encoder-weights": fingerprint},
        "store": {
            **store_location(cfg),
            "partitions": cfg.partition.dir or None,
            **_store_manifest(store_location(cfg).get("path")),
        },
    }


def _store_manifest(path: str | None) -> dict:
    """What the store itself records (embedding model, dim, count, any fingerprint), when it is on this machine."""
    if not path or not (Path(path) / MANIFEST).exists():
        return {"found": False}
    return {"found": True, "manifest": _read_json(Path(path) / MANIFEST)}


def _weights_sha256(folder: Path) -> str:
    """One hash over a model folder's weight files, in name order: the same weights give the same vectors."""
    digest = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.suffix in (".safetensors", ".bin") and f.is_file():
            digest.update(f.relative_to(folder).as_posix().encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
