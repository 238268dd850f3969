"""Embedding-cache benchmark (issue 21): what a shard costs with and without cached vectors.

    python benchmarks/bench_embedding_cache.py --passages 3000            # the shared cache in $FEDRAG_CACHE_DIR
    python benchmarks/bench_embedding_cache.py --passages 3000 --fresh    # a temp cache: encodes all 3,000

Prints: the key's cost (corpus sha256, encoder fingerprint), encoding rate into the cache (passages not cached
yet), opening the cache (reading its chunk files), and building a Qdrant Edge shard from cached vectors, with no
encoder call (vectors read, upsert, HNSW build), plus linear extrapolations to 15,000 and 45,739 passages.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from fedrag_app.config.app_config import DataConfig, RetrieverConfig
from fedrag_app.data.loaders import corpus_path, load_passages
from fedrag_app.rag.embedding_cache import EmbeddingCache, file_sha256
from fedrag_app.rag.ingest import build_shard
from fedrag_app.rag.retriever import context_encoder_fingerprint, load_retriever


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=3000, help="the first N passages of the corpus")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fresh", action="store_true", help="a temp cache folder (encode everything)")
    args = ap.parse_args()
    if args.fresh:
        os.environ["FEDRAG_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedrag-bench-cache-")
    data = DataConfig()
    corpus = corpus_path(data)
    passages = load_passages(data, limit=args.passages)
    retriever = load_retriever(RetrieverConfig())

    t0 = time.perf_counter()
    file_sha256(corpus)
    t1 = time.perf_counter()
    context_encoder_fingerprint(retriever)
    t2 = time.perf_counter()
    print(
        f"key: corpus sha256 {t1 - t0:.2f} s ({corpus.stat().st_size / 1e6:.1f} MB), "
        f"encoder fingerprint {t2 - t1:.2f} s"
    )

    cache = EmbeddingCache.open(corpus, retriever)
    todo = len(cache.missing(passages))
    t0 = time.perf_counter()
    cache.fill(passages, batch_size=args.batch_size)
    encode_s = time.perf_counter() - t0
    if todo:
        print(
            f"encode into the cache: {todo} passages in {encode_s:.1f} s = {todo / encode_s:.1f} passages/s "
            f"(45,739 would take {45739 / (todo / encode_s) / 60:.0f} min)"
        )
    else:
        print(f"encode into the cache: all {len(passages)} passages were cached already ({cache.folder})")

    t0 = time.perf_counter()
    reopened = EmbeddingCache.open(corpus, retriever)
    open_s = time.perf_counter() - t0
    print(f"open the cache ({len(reopened)} vectors, incl. key): {open_s:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        stats = build_shard(passages, retriever, path=str(Path(tmp) / "shard"), cache=reopened, progress=False)
        build_s = time.perf_counter() - t0
    assert stats.encoded == 0
    per = build_s / len(passages)
    print(
        f"shard from cached vectors: {len(passages)} passages in {build_s:.1f} s (read {stats.encode_s:.1f} s, "
        f"upsert {stats.upsert_s:.1f} s, HNSW {stats.index_s:.1f} s); linear extrapolation: 15,000 -> "
        f"{15000 * per:.0f} s, 45,739 -> {45739 * per:.0f} s"
    )


if __name__ == "__main__":
    main()
