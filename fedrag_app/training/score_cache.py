"""A cache of LSR's LM scores for a frozen generator (train.mode = lsr).

log p_LM(answer | passage, question) is a pure function of the generator's weights and the scored token sequence,
and with LSR alone the generator never changes: rounds, seeds and table columns score the same (question, answer,
passage) triples again and again, and scoring is 97% of an LSR phase (docs/PERFORMANCE.md). Each entry is keyed by
sha256(generator fingerprint, the sequence's token ids, its labelled positions): the token ids already hold the
prompt template, the question, the answer and the passage as truncated, so a change to any of them is a miss,
never a stale hit. It stores the summed log-probability and the token count, so 'sum' and 'mean' share entries.
SQLite, so nodes of one simulation (several processes) can share a file safely.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import torch

from fedrag_app.core.environment import cache_dir
from fedrag_app.rag.generator import Generator


def default_path() -> Path:
    """<cache>/lm_scores.sqlite: one per machine, shared by every run, node and seed on it."""
    return cache_dir() / "lm_scores.sqlite"


def generator_fingerprint(gen: Generator) -> str:
    """sha256 of the model name, every adapter weight (all of each 'lora_' tensor) and a slice of every base tensor
    (enough to tell two checkpoints apart without hashing 0.5 GB each phase).

    While every LoRA B is zero (a fresh adapter: PEFT's init) the adapter adds exactly nothing, whatever its random
    A, so the A tensors are left out: LSR runs with different seeds (different A, same function) share the cache."""
    params = list(gen.model.named_parameters())
    identity = all(not p.detach().any() for n, p in params if _is_lora_b(n))
    h = hashlib.sha256(gen.name.encode())
    for name, param in params:
        if identity and _is_lora_a(name):
            continue
        data = param.detach()
        if "lora_" not in name:
            data = data.flatten()[:1024]
        h.update(name.encode())
        h.update(str(data.dtype).encode())
        h.update(data.to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(repr(sorted(getattr(gen.model, "active_adapters", []) or [])).encode())
    return h.hexdigest()


def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name or ".lora_embedding_B." in name


def _is_lora_a(name: str) -> bool:
    return ".lora_A." in name or ".lora_embedding_A." in name


def sequence_key(fingerprint: str, input_ids: list[int], labels: list[int]) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(repr((input_ids, labels)).encode())
    return h.hexdigest()


class ScoreCache:
    """key -> (Σ answer-token log-prob, answer tokens), in one SQLite file; a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=120, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, total REAL NOT NULL, count INTEGER NOT NULL)"
        )
        self.hits = self.misses = 0  # lookups answered / not, since opening

    def get_many(self, keys: list[str]) -> dict[str, tuple[float, int]]:
        out: dict[str, tuple[float, int]] = {}
        for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = keys[start : start + 500]
            rows = self._db.execute(
                f"SELECT key, total, count FROM scores WHERE key IN ({','.join('?' * len(chunk))})", chunk
            )
            out.update({k: (t, c) for k, t, c in rows})
        self.hits += len(out)
        self.misses += len(keys) - len(out)
        return out

    def put_many(self, items: dict[str, tuple[float, int]]) -> None:
        with self._db:  # one transaction: all of a phase's new scores, or none
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?)", [(k, t, c) for k, (t, c) in items.items()]
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
