"""Ingestion: passages -> embeddings -> a Qdrant store, with a progress bar, never half-built.

An embedded shard is built in a temp sibling folder and renamed into place only after its index is built
and its manifest says complete; a server collection is marked complete only at the end. An interrupted
build therefore never leaves a store that ``KnowledgeStore.open`` accepts.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedrag_app.data import Passage
from fedrag_app.errors import StoreError
from fedrag_app.knowledge_store import KnowledgeStore
from fedrag_app.prompts import format_passage


@dataclass(frozen=True)
class IndexStats:
    passages: int
    encode_s: float
    upsert_s: float
    index_s: float

    @property
    def total_s(self) -> float:
        return self.encode_s + self.upsert_s + self.index_s

    def __str__(self) -> str:
        rate = self.passages / self.total_s if self.total_s else 0.0
        store_share = (self.upsert_s + self.index_s) / self.total_s if self.total_s else 0.0
        return (f"{self.passages} passages in {self.total_s:.1f} s ({rate:.0f}/s; encode {self.encode_s:.1f} s, "
                f"store {self.upsert_s + self.index_s:.1f} s = {store_share:.0%})")


def _batches(items: Iterable[Passage], size: int) -> Iterator[list[Passage]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _fill(store: KnowledgeStore, passages: Iterable[Passage], encoder, batch_size: int, chunk_size: int,
          total: int | None, progress: bool) -> IndexStats:
    encode_s = upsert_s = 0.0
    count = 0
    columns = (TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("index", total=total)
        for batch in _batches(passages, chunk_size):  # the encoder sorts a chunk by length: little padding per forward
            t0 = time.perf_counter()
            vectors = encoder.encode_passages([format_passage(p.title, p.text) for p in batch], batch_size=batch_size)
            t1 = time.perf_counter()
            store.add([p.id for p in batch], vectors, [p.title for p in batch], [p.text for p in batch])
            upsert_s += time.perf_counter() - t1
            encode_s += t1 - t0
            count += len(batch)
            bar.update(task, advance=len(batch))
    t2 = time.perf_counter()
    store.finalize()
    return IndexStats(count, encode_s, upsert_s, time.perf_counter() - t2)


def _fingerprint(encoder) -> str | None:
    """The context encoder's weight fingerprint, recorded in the store (None for an encoder without one)."""
    fingerprint = getattr(encoder, "context_fingerprint", None)
    return fingerprint() if fingerprint else None


def build_shard(passages: Iterable[Passage], encoder, *, path: str | None = None, url: str | None = None,
                collection: str = "passages", batch_size: int = 16, chunk_size: int = 512, total: int | None = None,
                progress: bool = True, replace: bool = False) -> IndexStats:
    """Encode ``passages`` with ``encoder.encode_passages`` and store them; atomic for a shard folder.

    ``replace`` swaps a new build over an existing shard (re-indexing); otherwise an existing one is an error.
    """
    if url:
        with KnowledgeStore.create(url=url, collection=collection, embedding_model=encoder.name, dim=encoder.dim,
                                   context_fingerprint=_fingerprint(encoder)) as store:
            return _fill(store, passages, encoder, batch_size, chunk_size, total, progress)
    target = Path(path).expanduser().resolve()
    if target.exists() and not replace:
        raise StoreError(f"{target} already exists: remove it, choose another store.path, or re-index with replace")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        with KnowledgeStore.create(path=tmp / "store", embedding_model=encoder.name, dim=encoder.dim,
                                   context_fingerprint=_fingerprint(encoder)) as store:
            stats = _fill(store, passages, encoder, batch_size, chunk_size, total, progress)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        (tmp / "store").rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return stats
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def iter_store_passages(store_path: str) -> Iterator[Passage]:
    """Every passage kept in an embedded shard's payloads (what re-indexing re-encodes)."""
    import qdrant_edge as qe

    with KnowledgeStore.open(path=store_path) as store:
        shard, offset = store._backend.shard, None
        while True:
            records, offset = shard.scroll(qe.ScrollRequest(limit=1024, offset=offset, with_payload=True, with_vector=False))
            for r in records:
                yield Passage(r.payload["pid"], r.payload.get("title", ""), r.payload.get("text", ""))
            if offset is None:
                break


def reindex(store_path: str, encoder, *, batch_size: int = 16, progress: bool = True) -> IndexStats:
    """Rebuild an embedded shard with a new context encoder (after LSR trained it), swapped in atomically."""
    passages = list(iter_store_passages(store_path))
    return build_shard(passages, encoder, path=store_path, batch_size=batch_size, total=len(passages),
                       progress=progress, replace=True)
