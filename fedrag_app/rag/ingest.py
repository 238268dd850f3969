"""Ingestion: passages -> embeddings -> a Qdrant store, with a progress bar, never half-built.

An embedded shard is built in a temp sibling folder and renamed into place only after its index is built
and its manifest says complete; a server collection is marked complete only at the end. An interrupted
build therefore never leaves a store that ``KnowledgeStore.open`` accepts, and the temp folder of a build
that was killed outright is removed by the next build beside it (once no live process holds it).
With an ``EmbeddingCache`` the vectors come from the cache (encoding only passages not cached yet), so an
interrupted index resumes from what was already encoded and a rebuild costs seconds, not an encoding.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedrag_app.core.atomic import staging_dir, swap_in, write_json
from fedrag_app.core.errors import DataError, StoreError
from fedrag_app.data.loaders import Passage
from fedrag_app.rag.knowledge_store import KnowledgeStore
from fedrag_app.rag.prompts import format_passage

BUILDER = "builder.json"  # in a building folder: which process builds it
UNCLAIMED_GRACE_S = 600  # a building folder without BUILDER this young may be one whose builder is just starting


@dataclass(frozen=True)
class IndexStats:
    passages: int
    encode_s: float
    upsert_s: float
    index_s: float
    encoded: int = -1  # passages encoded for this build; the rest came from the embedding cache (-1: no cache)

    @property
    def total_s(self) -> float:
        return self.encode_s + self.upsert_s + self.index_s

    def __str__(self) -> str:
        rate = self.passages / self.total_s if self.total_s else 0.0
        store_share = (self.upsert_s + self.index_s) / self.total_s if self.total_s else 0.0
        cached = f"; {self.passages - self.encoded} from the embedding cache" if self.encoded >= 0 else ""
        return (
            f"{self.passages} passages in {self.total_s:.1f} s ({rate:.0f}/s; encode {self.encode_s:.1f} s, "
            f"store {self.upsert_s + self.index_s:.1f} s = {store_share:.0%}{cached})"
        )


def progress_bar(label: str, *, disable: bool = False) -> Progress:
    """A determinate bar: done/total, time elapsed and time left."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        disable=disable,
    )


def encode_into_cache(
    cache, passages: Sequence[Passage], *, batch_size: int = 16, chunk_size: int = 512, progress: bool = True
) -> tuple[int, float]:
    """Fill ``cache`` with the passages it lacks, under one bar whose total is what is left to encode."""
    todo = len(cache.missing(passages))
    t0 = time.perf_counter()
    if todo:
        with progress_bar("encoding", disable=not progress) as bar:
            if progress:
                bar.console.print(
                    f"{len(passages) - todo} of {len(passages)} passages already in the embedding cache "
                    f"({cache.folder}); encoding {todo}"
                )
            task = bar.add_task("encode", total=todo)
            cache.fill(
                passages, batch_size=batch_size, chunk_size=chunk_size, on_encoded=lambda n: bar.update(task, advance=n)
            )
    return todo, time.perf_counter() - t0


def _batches(items: Iterable[Passage], size: int) -> Iterator[list[Passage]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _fill(
    store: KnowledgeStore,
    passages: Iterable[Passage],
    encoder,
    batch_size: int,
    chunk_size: int,
    total: int | None,
    progress: bool,
    cache,
) -> IndexStats:
    encode_s = upsert_s = 0.0
    count, encoded = 0, -1
    if cache is not None:
        passages = list(passages)
        encoded, encode_s = encode_into_cache(
            cache, passages, batch_size=batch_size, chunk_size=chunk_size, progress=progress
        )
        total = len(passages)
    with progress_bar("storing" if cache is not None else "indexing", disable=not progress) as bar:
        task = bar.add_task("index", total=total)
        for batch in _batches(passages, chunk_size):  # the encoder sorts a chunk by length: little padding per forward
            t0 = time.perf_counter()
            if cache is not None:
                vectors = cache.vectors(batch)  # all cached by now: no encoder call
            else:
                vectors = encoder.encode_passages(
                    [format_passage(p.title, p.text) for p in batch], batch_size=batch_size
                )
            t1 = time.perf_counter()
            store.add([p.id for p in batch], vectors, [p.title for p in batch], [p.text for p in batch])
            upsert_s += time.perf_counter() - t1
            encode_s += t1 - t0
            count += len(batch)
            bar.update(task, advance=len(batch))
    if not count:
        raise DataError("no passages to index: an empty store would answer nothing")
    t2 = time.perf_counter()
    store.finalize()
    return IndexStats(count, encode_s, upsert_s, time.perf_counter() - t2, encoded)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held(folder: Path) -> bool:
    """Whether a live build may still own ``folder``: its store lock is taken, or its builder process lives."""
    lock = folder / "store" / ".lock"
    if lock.exists():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    try:
        owner = json.loads((folder / BUILDER).read_text())
    except (OSError, ValueError):
        return time.time() - folder.stat().st_mtime < UNCLAIMED_GRACE_S
    if owner.get("host") != socket.gethostname():
        return time.time() - folder.stat().st_mtime < 24 * 3600  # another machine's build: only by age
    return _alive(int(owner.get("pid", -1)))


def clean_stale_builds(target: Path) -> list[Path]:
    """Remove ``.<name>.building-*`` folders beside ``target`` left by a killed build; returns what was removed."""
    removed = []
    for folder in target.parent.glob(f".{target.name}.building-*"):
        try:
            if folder.is_dir() and not _held(folder):
                shutil.rmtree(folder)
                removed.append(folder)
        except FileNotFoundError:  # its builder finished meanwhile
            continue
    return removed


def _fingerprint(encoder) -> str | None:
    """The context encoder's weight fingerprint, recorded in the store (None for an encoder without one)."""
    fingerprint = getattr(encoder, "context_fingerprint", None)
    return fingerprint() if fingerprint else None


def build_shard(
    passages: Iterable[Passage],
    encoder,
    *,
    path: str | None = None,
    url: str | None = None,
    collection: str = "passages",
    batch_size: int = 16,
    chunk_size: int = 512,
    total: int | None = None,
    progress: bool = True,
    replace: bool = False,
    cache=None,
) -> IndexStats:
    """Store ``passages`` with vectors from ``cache`` (an EmbeddingCache; missing ones encoded into it first) or,
    without one, from ``encoder.encode_passages``; atomic for a shard folder. No passages is a DataError.

    ``replace`` swaps a new build over an existing shard (re-indexing); otherwise an existing one is an error.
    """
    if isinstance(passages, Sequence):
        if not passages:
            raise DataError("no passages to index: an empty store would answer nothing")
        total = len(passages) if total is None else total
    if url:
        with KnowledgeStore.create(
            url=url,
            collection=collection,
            embedding_model=encoder.name,
            dim=encoder.dim,
            context_fingerprint=_fingerprint(encoder),
        ) as store:
            return _fill(store, passages, encoder, batch_size, chunk_size, total, progress, cache)
    target = Path(path).expanduser().resolve()
    if target.exists() and not replace:
        raise StoreError(f"{target} already exists: remove it, choose another store.path, or re-index with replace")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_builds(target)
    tmp = staging_dir(target, "building")
    try:
        write_json(tmp / BUILDER, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        with KnowledgeStore.create(
            path=tmp / "store", embedding_model=encoder.name, dim=encoder.dim, context_fingerprint=_fingerprint(encoder)
        ) as store:
            stats = _fill(store, passages, encoder, batch_size, chunk_size, total, progress, cache)
        try:
            swap_in(tmp / "store", target, exists="replace" if replace else "error")
        except FileExistsError:
            raise StoreError(f"{target} was built by another process meanwhile: use that one") from None
        return stats
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def iter_store_passages(store_path: str) -> Iterator[Passage]:
    """Every passage kept in an embedded shard's payloads (what re-indexing re-encodes)."""
    import qdrant_edge as qe

    with KnowledgeStore.open(path=store_path) as store:
        shard, offset = store._backend.shard, None
        while True:
            records, offset = shard.scroll(
                qe.ScrollRequest(limit=1024, offset=offset, with_payload=True, with_vector=False)
            )
            for r in records:
                yield Passage(r.payload["pid"], r.payload.get("title", ""), r.payload.get("text", ""))
            if offset is None:
                break


def reindex(store_path: str, encoder, *, batch_size: int = 16, progress: bool = True) -> IndexStats:
    """Rebuild an embedded shard with a new context encoder (after LSR trained it), swapped in atomically."""
    passages = list(iter_store_passages(store_path))
    return build_shard(
        passages, encoder, path=store_path, batch_size=batch_size, total=len(passages), progress=progress, replace=True
    )
