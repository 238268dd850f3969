"""The knowledge store: one interface over Qdrant, embedded (Qdrant Edge, a shard folder) or a server (url).

Like qdrant-client, the constructor picks the backend from where the data lives: ``path=`` is an embedded
Qdrant Edge shard folder (the default, one per institution); ``url=`` is a Qdrant server (``":memory:"`` is
qdrant-client's local mode, which speaks the same API and is what tests use for this path).

Every store records the embedding model and dimension it was built with, and whether its build completed:
opening it with another retriever, or opening a half-built store, is a StoreError, never silent garbage.
An embedded shard is held by one process at a time (a lock file), as Qdrant's own local mode does.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrag_app.core.atomic import write_json
from fedrag_app.core.errors import StoreError

MANIFEST = "manifest.json"
_ID_NAMESPACE = uuid.UUID("6f1c2d5e-8b0a-4c1e-9a57-0d3b7e1f2a90")  # passage id -> point id (uuid5), stable
HNSW_M, HNSW_EF_CONSTRUCT, HNSW_EF_SEARCH = 16, 128, 128


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    title: str
    text: str
    vector: np.ndarray | None = None


def point_id(passage_id: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, passage_id))


def _hit(point) -> Hit:
    payload = point.payload or {}
    vec = point.vector
    if isinstance(vec, dict):  # qdrant-client returns {"": [...]} for an unnamed vector in some versions
        vec = next(iter(vec.values()))
    return Hit(
        payload.get("pid", str(point.id)),
        float(point.score),
        payload.get("title", ""),
        payload.get("text", ""),
        None if vec is None else np.asarray(vec, dtype=np.float32),
    )


class _EdgeBackend:
    """Qdrant Edge in-process: a persistent shard under <folder>/shard, HNSW after finalize()."""

    def __init__(self, folder: Path, dim: int, *, create: bool):
        import qdrant_edge as qe

        self.qe, self.folder = qe, folder
        shard_dir = str(folder / "shard")
        if create:
            config = qe.EdgeConfig(
                vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine),
                hnsw_config=qe.HnswIndexConfig(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT, full_scan_threshold=1000),
            )
            self.shard = qe.EdgeShard.create(shard_dir, config)
        else:
            self.shard = qe.EdgeShard.load(shard_dir)

    def upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        points = [self.qe.Point(i, v.tolist(), p) for i, v, p in zip(ids, vectors, payloads)]
        self.shard.update(self.qe.UpdateOperation.upsert_points(points))

    def _request(self, vector: np.ndarray, top_k: int, with_vectors: bool, exact: bool):
        return self.qe.QueryRequest(
            limit=top_k,
            query=self.qe.Query.Nearest(vector.tolist()),
            with_payload=True,
            with_vector=with_vectors,
            params=self.qe.SearchParams(hnsw_ef=HNSW_EF_SEARCH, exact=exact),
        )

    def search_batch(self, vectors: np.ndarray, top_k: int, with_vectors: bool, exact: bool = False) -> list[list]:
        requests = [self._request(v, top_k, with_vectors, exact) for v in vectors]
        return self.shard.query_batch(self.qe.QueryBatchRequest(requests))

    def count(self) -> int:
        return int(self.shard.count(self.qe.CountRequest(exact=True)))

    def finalize(self) -> None:
        self.shard.optimize()  # builds the HNSW index
        self.shard.flush()

    def close(self) -> None:
        self.shard.close()


class _ServerBackend:
    """A Qdrant server through qdrant-client (url), or its local mode (':memory:'); metadata on the collection."""

    def __init__(self, url: str, collection: str, dim: int | None, *, create: bool, metadata: dict | None = None):
        from qdrant_client import QdrantClient, models

        self.models, self.collection = models, collection
        try:
            self.client = QdrantClient(location=":memory:") if url == ":memory:" else QdrantClient(url=url, timeout=10)
            exists = self.client.collection_exists(collection)
        except Exception as e:  # connection errors come as several httpx/grpc types
            raise StoreError(f"cannot reach the Qdrant server at {url}: {type(e).__name__}: {e}") from e
        if create:
            if exists:
                raise StoreError(f"collection '{collection}' already exists at {url}: pick another store.collection")
            self.client.create_collection(
                collection,
                metadata=metadata,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
            )
        elif not exists:
            raise StoreError(
                f"collection '{collection}' does not exist at {url}: "
                f"build it with `fedrag-app index --set store.url={url}`"
            )

    def metadata(self) -> dict:
        return dict(self.client.get_collection(self.collection).config.metadata or {})

    def upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        self.client.upsert(
            self.collection, points=self.models.Batch(ids=ids, vectors=vectors.tolist(), payloads=payloads)
        )

    def search_batch(self, vectors: np.ndarray, top_k: int, with_vectors: bool, exact: bool = False) -> list[list]:
        params = self.models.SearchParams(exact=exact)
        requests = [
            self.models.QueryRequest(
                query=v.tolist(), limit=top_k, with_payload=True, with_vector=with_vectors, params=params
            )
            for v in vectors
        ]
        return [r.points for r in self.client.query_batch_points(self.collection, requests)]

    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def finalize(self) -> None:
        self.client.update_collection(self.collection, metadata={**self.metadata(), "complete": True})

    def close(self) -> None:
        self.client.close()


class KnowledgeStore:
    """add / search / search_batch / count / close over either backend; a context manager."""

    def __init__(self, backend, *, embedding_model: str, dim: int, where: str, lock_fd: int | None = None):
        self._backend, self.embedding_model, self.dim, self.where, self._lock_fd = (
            backend,
            embedding_model,
            dim,
            where,
            lock_fd,
        )

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        *,
        path: str | os.PathLike | None = None,
        url: str | None = None,
        collection: str = "passages",
        embedding_model: str,
        dim: int,
        context_fingerprint: str | None = None,
    ) -> KnowledgeStore:
        """A new, empty store; it reads as incomplete until ``finalize()``. ``context_fingerprint`` (of the context
        encoder's weights, DualEncoder.context_fingerprint) is recorded: a trained context encoder's vectors differ."""
        _one_location(path, url)
        meta = {"embedding_model": embedding_model, "dim": int(dim), "complete": False}
        if context_fingerprint is not None:
            meta["context_fingerprint"] = context_fingerprint
        if url:
            backend = _ServerBackend(url, collection, dim, create=True, metadata=meta)
            return cls(backend, embedding_model=embedding_model, dim=dim, where=f"{url} ({collection})")
        folder = Path(path)
        if (folder / MANIFEST).exists():
            raise StoreError(f"{folder} already holds a store: remove it or choose another store.path")
        folder.mkdir(parents=True, exist_ok=True)
        lock = _lock(folder)
        write_json(folder / MANIFEST, meta)
        return cls(
            _EdgeBackend(folder, dim, create=True),
            embedding_model=embedding_model,
            dim=dim,
            where=str(folder),
            lock_fd=lock,
        )

    @classmethod
    def open(
        cls,
        *,
        path: str | os.PathLike | None = None,
        url: str | None = None,
        collection: str = "passages",
        embedding_model: str | None = None,
        dim: int | None = None,
        context_fingerprint: str | None = None,
    ) -> KnowledgeStore:
        """An existing, completely built store, checked against the retriever that will query it."""
        _one_location(path, url)
        if url:
            backend = _ServerBackend(url, collection, None, create=False)
            meta, where, lock = backend.metadata(), f"{url} ({collection})", None
        else:
            folder = Path(path)
            where = str(folder)
            if not (folder / MANIFEST).exists():
                raise StoreError(f"{folder} is not a knowledge store (no {MANIFEST}): build it with `fedrag-app index`")
            meta = json.loads((folder / MANIFEST).read_text())
            lock = _lock(folder)
            backend = None
        try:
            _check(meta, where, embedding_model, dim, context_fingerprint)
            backend = backend or _EdgeBackend(Path(path), int(meta["dim"]), create=False)
        except BaseException:
            _unlock(lock)
            raise
        return cls(backend, embedding_model=meta["embedding_model"], dim=int(meta["dim"]), where=where, lock_fd=lock)

    # -- operations ------------------------------------------------------------------------------------------
    def add(self, ids: list[str], vectors: np.ndarray, titles: list[str], texts: list[str]) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        assert vectors.shape == (len(ids), self.dim), f"vectors {vectors.shape} != ({len(ids)}, {self.dim})"
        payloads = [{"pid": i, "title": t, "text": x} for i, t, x in zip(ids, titles, texts)]
        self._backend.upsert([point_id(i) for i in ids], vectors, payloads)

    def search(self, vector: np.ndarray, top_k: int, *, with_vectors: bool = False) -> list[Hit]:
        return self.search_batch(np.asarray(vector, dtype=np.float32)[None, :], top_k, with_vectors=with_vectors)[0]

    def search_batch(
        self, vectors: np.ndarray, top_k: int, *, with_vectors: bool = False, exact: bool = False
    ) -> list[list[Hit]]:
        """Top-k hits per query vector. ``exact``: a full scan instead of the HNSW graph, whose answers are
        approximate and depend on how the graph was built (a store rebuilt on another machine differs in a few
        top-k lists): for checks that must not depend on the index."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise StoreError(f"query vectors of shape {vectors.shape} do not fit store {self.where} ({self.dim}-d)")
        found = self._backend.search_batch(vectors, top_k, with_vectors, exact)
        return [[_hit(p) for p in points] for points in found]

    def count(self) -> int:
        return self._backend.count()

    def finalize(self) -> None:
        """Build the index, flush, and mark the store complete (the last write of a build)."""
        self._backend.finalize()
        if self._lock_fd is not None:
            folder = Path(self.where)
            meta = json.loads((folder / MANIFEST).read_text())
            write_json(folder / MANIFEST, {**meta, "complete": True, "count": self.count()})

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        _unlock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> KnowledgeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _one_location(path, url) -> None:
    if (path is None) == (url is None) or (path is not None and not str(path)) or (url is not None and not url):
        raise StoreError("give exactly one of store.path (embedded Qdrant Edge) or store.url (Qdrant server)")


def _check(
    meta: dict, where: str, embedding_model: str | None, dim: int | None, fingerprint: str | None = None
) -> None:
    if not meta.get("complete"):
        raise StoreError(f"store {where} is incomplete (its build was interrupted): rebuild it with `fedrag-app index`")
    if embedding_model is not None and meta.get("embedding_model") != embedding_model:
        raise StoreError(
            f"store {where} was built with retriever '{meta.get('embedding_model')}', not '{embedding_model}': "
            "re-index it with this retriever, or configure the one it was built with"
        )
    if dim is not None and int(meta.get("dim", -1)) != int(dim):
        raise StoreError(f"store {where} holds {meta.get('dim')}-d vectors, but the retriever makes {dim}-d vectors")
    built = meta.get("context_fingerprint")  # absent in stores built before it was recorded
    if fingerprint is not None and built is not None and built != fingerprint:
        raise StoreError(
            f"store {where} was built by a context encoder with weights {built}, not this one's "
            f"({fingerprint}): its vectors are stale; re-index it with this retriever"
        )


def _lock(folder: Path) -> int:
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise StoreError(
            f"store {folder} is already open in another process; one process per embedded shard "
            "(close it there, or serve the data from a Qdrant server with store.url)"
        ) from e
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
