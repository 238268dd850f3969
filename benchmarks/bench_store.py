"""Knowledge-store benchmark (issue 2): indexing throughput and search latency/recall, Qdrant Edge vs qdrant-client.

    python benchmarks/bench_store.py                 # full 45,739-passage corpus (encoding ≈50 min on 2 cores)
    python benchmarks/bench_store.py --limit 5000    # the FedRAG W1 shape
    python benchmarks/bench_store.py --limit 5000 --peer ../peer-venv/bin/python   # + fed-rag W1, same run

Embeddings are cached in --cache so the store figures can be re-measured without re-encoding.
Prints: encode passages/s, encode+upsert passages/s and the store's share, search p50/p95 (query already
encoded) and recall@10 against exact search for both backends, and the W1 shape (5,000 passages, top-k 2).
With --peer, the FedRAG library (fed-rag 0.0.27 in its own virtualenv, benchmarks/peer_fedrag.py) runs the same
passages and queries right after, and the ratios are printed; encoding is then measured afresh (no cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_train import HERE, in_subprocess, matmul_peak_gflops  # same folder: shared by both benchmarks
from peer_fedrag import peak_rss_mib  # importing the module loads no fed-rag

from fedrag_app.config.app_config import DataConfig, RetrieverConfig
from fedrag_app.core import environment
from fedrag_app.data.loaders import iter_passages, load_web_questions
from fedrag_app.rag.knowledge_store import KnowledgeStore
from fedrag_app.rag.prompts import format_passage
from fedrag_app.rag.retriever import load_retriever


def encode(retriever, passages, cache: Path, batch_size: int) -> tuple[np.ndarray, float | None]:
    if cache.exists():
        emb = np.load(cache)
        if len(emb) == len(passages):
            return emb, None
    t0 = time.perf_counter()
    emb = retriever.encode_passages([format_passage(p.title, p.text) for p in passages], batch_size=batch_size)
    seconds = time.perf_counter() - t0
    np.save(cache, emb)
    return emb, seconds


def fill(store: KnowledgeStore, passages, emb: np.ndarray, batch: int = 1024) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(passages), batch):
        chunk = passages[i : i + batch]
        store.add([p.id for p in chunk], emb[i : i + batch], [p.title for p in chunk], [p.text for p in chunk])
    store.finalize()
    return time.perf_counter() - t0


def latency(store: KnowledgeStore, queries: np.ndarray, top_k: int) -> tuple[float, float, list[list[str]]]:
    store.search(queries[0], top_k)  # warm-up
    times, ids = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = store.search(q, top_k)
        times.append((time.perf_counter() - t0) * 1e3)
        ids.append([h.id for h in hits])
    return float(np.percentile(times, 50)), float(np.percentile(times, 95)), ids


def encode_flops(model, texts: list[str]) -> float:
    """Useful FLOPs of encoding ``texts`` with a BERT-style sentence-transformer: the encoder layers' linears
    (2N per token) and bidirectional attention (QK^T + AV = 4 L^2 H per layer); padding not counted."""
    import torch

    bert = model[0].auto_model
    n = sum(
        m.weight.numel() for name, m in bert.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in name
    )
    lengths = [
        len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
    ]
    cfg = bert.config
    return sum(2 * n * L + 4 * L * L * cfg.hidden_size * cfg.num_hidden_layers for L in lengths)


def recall(found: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="passages to index (0 = all 45,739)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache", default="/tmp/fedrag_bench_store_emb.npy")
    ap.add_argument("--peer", default="", help="python of a fed-rag==0.0.27 virtualenv: run its W1 store workload too")
    args = ap.parse_args()

    data = DataConfig(dir=environment.data_dir() or str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    passages = list(iter_passages(data, limit=args.limit))
    retriever = load_retriever(RetrieverConfig())
    cache = Path(args.cache).with_suffix(f".{len(passages)}.npy")
    if args.peer:
        cache.unlink(missing_ok=True)  # the side-by-side compares encoding too
    emb, encode_s = encode(retriever, passages, cache, args.batch_size)
    if encode_s is not None:
        flops = encode_flops(retriever.context_model, [format_passage(p.title, p.text) for p in passages])
        peak = matmul_peak_gflops()
    questions = [e.question for e in load_web_questions("train", data, limit=args.queries)]
    t0 = time.perf_counter()
    queries = retriever.encode_queries(questions).numpy()
    query_encode_ms = (time.perf_counter() - t0) * 1e3 / len(questions)
    exact10 = [[passages[i].id for i in row] for row in np.argsort(-(queries @ emb.T), axis=1)[:, :10]]

    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    rows = []
    try:
        for name, kwargs in (("qdrant-edge", {"path": tmp / "edge"}), ("qdrant-client local", {"url": ":memory:"})):
            with KnowledgeStore.create(embedding_model=retriever.name, dim=retriever.dim, **kwargs) as store:
                upsert_s = fill(store, passages, emb)
                p50, p95, ids = latency(store, queries, 10)
                p50_2, p95_2, _ = latency(store, queries, 2)
                rows.append((name, upsert_s, p50, p95, recall(ids, exact10), p50_2, p95_2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(passages)
    print(f"\npassages: {n}   queries: {len(queries)} (Web Questions train)   torch threads: {os.cpu_count()} cores")
    if encode_s is not None:
        edge_upsert = rows[0][1]
        print(
            f"encode only        : {n / encode_s:8.1f} passages/s  ({encode_s:.1f} s, batch {args.batch_size}); "
            f"{flops / encode_s / 1e9:.1f} GFLOP/s = MFU {flops / encode_s / 1e9 / peak:.0%} of the measured "
            f"fp32 matmul peak {peak:.1f} GFLOP/s"
        )
        print(
            f"encode + upsert    : {n / (encode_s + edge_upsert):8.1f} passages/s  (Qdrant Edge; store share "
            f"{edge_upsert / (encode_s + edge_upsert):.1%}, target <= 15%)"
        )
    else:
        print(f"encode             : cached in {cache} (delete it to re-measure encoding)")
    print(f"query encode       : {query_encode_ms:8.2f} ms/query (MiniLM, batch of all queries)")
    print(
        f"{'backend':22s} {'upsert+index s':>14s} {'p50 ms@10':>10s} {'p95 ms@10':>10s} {'recall@10':>10s} "
        f"{'p50 ms@2':>9s} {'p95 ms@2':>9s}"
    )
    for name, up, p50, p95, rec, p50_2, p95_2 in rows:
        print(f"{name:22s} {up:14.2f} {p50:10.3f} {p95:10.3f} {rec:10.4f} {p50_2:9.3f} {p95_2:9.3f}")
    if args.peer:
        compare_with_peer(args.peer, n, len(queries), n / encode_s, rows[0])


def compare_with_peer(python: str, n: int, n_queries: int, encode_rate: float, edge: tuple) -> None:
    """fed-rag's W1 on the same passages and queries, run now; ratio > 1 means fedrag_app is faster."""
    peer = in_subprocess(python, HERE / "peer_fedrag.py", "store", 0, "--passages", str(n), "--queries", str(n_queries))
    if "error" in peer:
        print(f"\nfed-rag store workload failed:\n{peer['error']}")
        return
    _, upsert_s, p50, p95, _, p50_2, p95_2 = edge
    print("\nside by side, same passages and queries (fed-rag 0.0.27: qdrant-client in-memory, its encode_context)")
    print(f"{'figure':34s} {'fedrag_app':>11s} {'fed-rag':>9s} {'ratio':>6s}")
    for name, ours, theirs, higher_better in (
        ("encode passages/s", encode_rate, peer["encode_passages_per_s"], True),
        ("store load + index s", upsert_s, peer["load_nodes_seconds"], False),
        ("search p50 ms @2", p50_2, peer["retrieve_ms_p50@2"], False),
        ("search p95 ms @2", p95_2, peer["retrieve_ms_p95@2"], False),
        ("search p50 ms @10", p50, peer["retrieve_ms_p50@10"], False),
        ("search p95 ms @10", p95, peer["retrieve_ms_p95@10"], False),
    ):
        ratio = ours / theirs if higher_better else theirs / ours
        print(f"{name:34s} {ours:11.3f} {theirs:9.3f} {ratio:5.2f}x")
    ours_rss = peak_rss_mib()
    print(f"{'peak RSS MiB (whole process)':34s} {ours_rss:11.0f} {peer['peak_rss_mib']:9.0f}")


if __name__ == "__main__":
    main()
