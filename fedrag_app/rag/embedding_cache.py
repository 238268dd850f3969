"""The embedding cache: passage vectors computed once per (corpus file, context encoder) and shared by every shard.

Encoding the 45,739-passage corpus takes about 45 minutes on 2 cores; building a shard from vectors takes
seconds. So every shard (`fedrag-app index`, each institution's shard from `fedrag-app partition`, the server's
evaluation store) takes its vectors from here, and only passages not cached yet are encoded.

Layout: ``<cache_dir>/embeddings/<corpus sha256[:16]>-<context_encoder_fingerprint[:16]>/`` holding ``meta.json`` and
``chunk-*.npz`` files (``ids``, ``digests`` of the encoded text, ``vectors``). Filled lazily, by passage: a chunk
is written (temp file, then rename) as soon as its passages are encoded, so an interrupted encoding resumes from
the chunks already written, and a small run pays only for the passages it uses. Several processes may fill one
cache at once: chunk names are unique, and a passage cached twice holds the same vector.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from fedrag_app.core.atomic import atomic_path, write_json
from fedrag_app.core.errors import StoreError
from fedrag_app.data.loaders import Passage
from fedrag_app.rag.prompts import format_passage
from fedrag_app.rag.retriever import context_encoder_fingerprint

_HASH_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks (the corpus is 33 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _digest(text: str) -> int:
    """64 bits of the encoded text: a passage that is not the corpus's own is caught, not served a wrong vector."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _texts(passages: Sequence[Passage]) -> list[str]:
    return [format_passage(p.title, p.text) for p in passages]


class EmbeddingCache:
    """Vectors of one corpus under one context encoder; ``vectors()`` encodes only what is missing."""

    def __init__(self, folder: Path, encoder, meta: dict):
        self.folder, self.encoder, self.meta = folder, encoder, meta
        self._rows: dict[str, tuple[int, int]] = {}  # passage id -> (chunk number, row)
        self._digests: list[np.ndarray] = []
        self._vectors: list[np.ndarray] = []
        self._loaded: set[str] = set()

    @classmethod
    def open(cls, corpus: str | os.PathLike, encoder, root: str | os.PathLike | None = None) -> EmbeddingCache:
        """The cache of ``corpus`` (the JSONL file the passages come from) under ``encoder``'s context encoder."""
        from fedrag_app.core.environment import cache_dir

        corpus = Path(corpus).resolve()
        corpus_sha, fingerprint = file_sha256(corpus), context_encoder_fingerprint(encoder)
        folder = Path(root or cache_dir() / "embeddings") / f"{corpus_sha[:16]}-{fingerprint[:16]}"
        meta = {
            "corpus": str(corpus),
            "corpus-sha256": corpus_sha,
            "encoder": encoder.name,
            "encoder-fingerprint": fingerprint,
            "dim": int(encoder.dim),
        }
        folder.mkdir(parents=True, exist_ok=True)
        for tmp in folder.glob(".chunk-*.tmp*"):  # a killed writer's chunk; a live writer renames within seconds
            with contextlib.suppress(FileNotFoundError):
                if time.time() - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
        if not (folder / "meta.json").exists():
            write_json(folder / "meta.json", meta)
        cache = cls(folder, encoder, meta)
        cache.refresh()
        return cache

    @property
    def key(self) -> str:
        return self.folder.name

    def __len__(self) -> int:
        return len(self._rows)

    def refresh(self) -> None:
        """Read chunk files written since the last look (by this process or another one)."""
        for path in sorted(self.folder.glob("chunk-*.npz")):
            if path.name in self._loaded:
                continue
            try:
                with np.load(path, allow_pickle=False) as z:
                    ids, digests, vectors = z["ids"], z["digests"], z["vectors"]
            except (OSError, ValueError, KeyError) as e:
                raise StoreError(
                    f"embedding cache chunk {path} is unreadable ({e}): delete it; its passages are re-encoded"
                ) from e
            if vectors.shape != (len(ids), int(self.meta["dim"])) or digests.shape != (len(ids),):
                raise StoreError(f"embedding cache chunk {path} holds vectors of shape {vectors.shape}: delete it")
            n = len(self._vectors)
            self._vectors.append(vectors)
            self._digests.append(digests)
            self._rows.update({str(pid): (n, row) for row, pid in enumerate(ids)})
            self._loaded.add(path.name)

    def missing(self, passages: Iterable[Passage]) -> list[Passage]:
        """The passages with no cached vector yet, in the order given, each once."""
        seen: set[str] = set()
        out = []
        for p in passages:
            if p.id not in self._rows and p.id not in seen:
                seen.add(p.id)
                out.append(p)
        return out

    def fill(
        self,
        passages: Sequence[Passage],
        *,
        batch_size: int = 16,
        chunk_size: int = 512,
        on_encoded: Callable[[int], None] | None = None,
    ) -> int:
        """Encode and store the passages not cached yet, one chunk file per ``chunk_size``; returns how many."""
        self.refresh()
        todo = self.missing(passages)
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            texts = _texts(chunk)  # the encoder sorts a chunk by length: little padding per forward
            vectors = np.asarray(self.encoder.encode_passages(texts, batch_size=batch_size), dtype=np.float32)
            self._write_chunk([p.id for p in chunk], np.array([_digest(t) for t in texts], dtype=np.uint64), vectors)
            if on_encoded is not None:
                on_encoded(len(chunk))
        return len(todo)

    def vectors(self, passages: Sequence[Passage], *, batch_size: int = 16, chunk_size: int = 512) -> np.ndarray:
        """(N, D) float32 vectors of ``passages`` in order: cached ones read, the others encoded and cached first."""
        if self.missing(passages):
            self.fill(passages, batch_size=batch_size, chunk_size=chunk_size)
        out = np.empty((len(passages), int(self.meta["dim"])), dtype=np.float32)
        for i, p in enumerate(passages):
            chunk, row = self._rows[p.id]
            if int(self._digests[chunk][row]) != _digest(format_passage(p.title, p.text)):
                raise StoreError(
                    f"passage {p.id!r} differs from the one cached in {self.folder} for this corpus: "
                    "passages given to the cache must come from its corpus file"
                )
            out[i] = self._vectors[chunk][row]
        return out

    def _write_chunk(self, ids: list[str], digests: np.ndarray, vectors: np.ndarray) -> None:
        """One chunk file, written atomically."""
        name = f"chunk-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
        with atomic_path(self.folder / name) as tmp:
            np.savez(tmp, ids=np.array(ids), digests=digests, vectors=vectors)
        n = len(self._vectors)
        self._vectors.append(vectors)
        self._digests.append(digests)
        self._rows.update({pid: (n, row) for row, pid in enumerate(ids)})
        self._loaded.add(name)
