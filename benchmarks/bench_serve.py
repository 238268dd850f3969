"""`fedrag-app serve` under load (issue 39): latency p50/p95 and requests/s of /v1/chat/completions at concurrency 1, 4
and 16, each request a Web Questions test question answered from the retrieved passages, as `ask` answers it.

    python benchmarks/bench_serve.py --store /tmp/bench-serve-shard            # starts `fedrag-app serve` on it
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000               # a server already running
    python benchmarks/bench_serve.py --mcp-retrieval 50                        # + retrieval via store.mcp-url

--mcp-retrieval N also times retrieval (top-10) of N questions through the server's MCP endpoint, as `store.mcp-url`
retrieves (rag/mcp_source.py), against this process searching its own copy of the shard: the latency an MCP
knowledge source adds per question.

A missing --store folder is built first with `fedrag-app index --limit 1000` (from the embedding cache when it holds
the corpus). The server is the CLI's own, with the config's defaults (eval.top-k 2, generator.max-new-tokens 32) unless
--top-k / --max-tokens say otherwise; requests queue on its one model, so requests/s is about 1 / (seconds per answer)
at every concurrency, and latency grows with the queue.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

FEDRAG_APP = str(Path(sys.executable).with_name("fedrag-app"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(n: int) -> list[str]:
    data = Path(os.environ.get("FEDRAG_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with open(data / "web_questions" / "test.jsonl") as f:
        return [json.loads(line)["question"] for line in f][:n]


def start_server(args) -> tuple[subprocess.Popen, str]:
    store = Path(args.store)
    if not store.exists():
        print(f"building {store} (fedrag-app index --limit {args.passages})", flush=True)
        index = [FEDRAG_APP, "index", "--limit", str(args.passages), "--store", str(store)]
        subprocess.run(index, check=True)
    port = free_port()
    argv = [FEDRAG_APP, "serve", "--port", str(port), "--store", str(store), "--top-k", str(args.top_k)]
    argv += ["--set", f"generator.max-new-tokens={args.max_tokens}", "--set", f"runtime.num-threads={args.threads}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    while True:
        if proc.poll() is not None:
            sys.exit(f"serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    print(f"serve ready in {time.perf_counter() - started:.1f} s (models loaded once)", flush=True)
    return proc, url


def one_level(url: str, qs: list[str], concurrency: int) -> dict:
    def ask(q: str) -> float:
        t = time.perf_counter()
        body = {"model": "fedrag", "messages": [{"role": "user", "content": q}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = np.array(list(pool.map(ask, qs)))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(qs),
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
        "req_per_s": len(qs) / wall,
    }


def mcp_retrieval(url: str, store: str, n: int, threads: int) -> dict:
    """Seconds per question of top-10 retrieval: local (encode + search a copy of the shard, with the server's torch
    threads) and through MCP."""
    import shutil

    import torch

    if threads:
        torch.set_num_threads(threads)

    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.rag.knowledge_store import KnowledgeStore
    from fedrag_app.rag.mcp_source import McpKnowledgeSource
    from fedrag_app.rag.retrieval import retrieve
    from fedrag_app.rag.retriever import load_retriever

    qs = questions(n)
    copy = Path(f"{store}-local")
    if not copy.exists():
        shutil.copytree(store, copy)
    retriever = load_retriever(AppConfig().retriever)
    times: dict[str, list[float]] = {"local": [], "mcp": []}
    with (
        KnowledgeStore.open(path=str(copy), embedding_model=retriever.name, dim=retriever.dim) as local,
        McpKnowledgeSource(f"{url}/mcp") as remote,
    ):
        same = 0
        for q in qs:
            t = time.perf_counter()
            a = retrieve(retriever, local, [q], 10)[0]
            times["local"].append(time.perf_counter() - t)
            t = time.perf_counter()
            b = retrieve(retriever, remote, [q], 10)[0]
            times["mcp"].append(time.perf_counter() - t)
            same += [h.id for h in a] == [h.id for h in b]
    return {k: (float(np.percentile(v, 50)), float(np.mean(v))) for k, v in times.items()} | {"same": same, "n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (else one is started on --store)")
    ap.add_argument("--store", default="/tmp/bench-serve-shard", help="shard for the started server")
    ap.add_argument("--passages", type=int, default=1000, help="passages in a shard built for the run")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: one per core)")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--mcp-retrieval", type=int, default=0, help="also time N questions' retrieval through /mcp")
    args = ap.parse_args()

    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        qs = questions(args.requests)
        one_level(url, qs[:1], 1)  # warm-up: first-call allocations out of the figures
        load = os.getloadavg()[0]
        rows = [one_level(url, qs, int(c)) for c in args.concurrency.split(",") if c]
        mcp = mcp_retrieval(url, args.store, args.mcp_retrieval, args.threads) if args.mcp_retrieval else None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load average {load:.1f} "
        f"at start; top-k {args.top_k}, max-new-tokens {args.max_tokens}, "
        f"server threads {args.threads or 'one per core'}, {args.requests} requests per level\n"
    )
    print("| concurrency | requests | p50 latency (s) | p95 latency (s) | requests/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['req_per_s']:.2f} |")
    if mcp:
        print(f"\nretrieval, top-10, {mcp['n']} questions one at a time ({mcp['same']} with the same top-10 both ways)")
        print("| where | p50 (ms) | mean (ms) |\n|---|---|---|")
        for where in ("local", "mcp"):
            print(f"| {where} | {mcp[where][0] * 1000:.1f} | {mcp[where][1] * 1000:.1f} |")


if __name__ == "__main__":
    main()
