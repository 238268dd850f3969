"""Federated RAG at question time (issue 17): federated retrieval (RRF and score sort) against one index over the
union of the institutions' shards, on Web Questions test questions, with seconds per question and their breakdown.

    python benchmarks/bench_federated_query.py --questions 30 --passages 2000       # small (docs/FEDERATION.md)
    python benchmarks/bench_federated_query.py --questions 500 --passages 0 --workdir /tmp/fedrag_fq_full  # full corpus

Steps (each skipped when its output is already in --workdir, so a long run can be resumed step by step):
1. prepare: `fedrag-app partition -n 3` (articles split by title, one Qdrant Edge shard per institution, the first
   --passages of each; 0 = all) and one shard over the union of exactly those passages.
2. federated: a real `flwr run` simulation per merge method with fed.task='query', every partition opted in:
   the ServerApp encodes each batch of questions, sends one query.retrieve message per node, merges the replies,
   answers with the base SmolLM2 from the merged top eval.top-k, and writes answers.jsonl + query-metrics.json.
   One more RRF run with --batch-size-compare questions per message measures what batching saves.
3. union: the same questions, retriever, prompt and generator in one process against the union shard.
Then a markdown table of answer recall@k, MRR@k, EM/F1 and seconds per question.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's fedrag_app
from fedrag_app.federation import follow_run  # noqa: E402

CLIENTS = 3


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(args, work: Path, env: dict) -> None:
    parts, union = work / "parts", work / "union-shard"
    if not (parts / "manifest.json").exists():
        subprocess.run(
            [
                str(Path(sys.executable).parent / "fedrag-app"),
                "partition",
                "-n",
                str(CLIENTS),
                "--out",
                str(parts),
                "--set",
                "partition.questions-per-client=2",
                "--set",
                f"partition.passages-per-client={args.passages}",
            ],
            check=True,
            env=env,
        )
    if not union.exists():
        from fedrag_app.config.app_config import AppConfig
        from fedrag_app.data.loaders import corpus_path, iter_passages
        from fedrag_app.federation.partition import assign_articles
        from fedrag_app.rag.embedding_cache import EmbeddingCache
        from fedrag_app.rag.ingest import build_shard
        from fedrag_app.rag.retriever import load_retriever

        cfg = AppConfig.from_flat({"partition.num-partitions": CLIENTS, "partition.passages-per-client": args.passages})
        passages = list(iter_passages(cfg.data))
        owners = assign_articles(sorted({p.title for p in passages}), cfg.partition, cfg.runtime.seed)  # as partition
        per_client = [[p for p in passages if i in owners[p.title]] for i in range(CLIENTS)]
        chosen = [c[: args.passages] if args.passages else c for c in per_client]
        manifest = json.loads((parts / "manifest.json").read_text())
        assert [len(c) for c in chosen] == [c["passages"] for c in manifest["clients"]], "not the partition's passages"
        docs = list({p.id: p for c in chosen for p in c}.values())
        print(f"  union index: {len(docs)} passages", flush=True)
        retriever = load_retriever(cfg.retriever)  # vectors from the embedding cache, as the institutions' shards
        cache = EmbeddingCache.open(corpus_path(cfg.data), retriever)
        build_shard(docs, retriever, path=str(union), total=len(docs), progress=False, cache=cache)


def federated(args, work: Path, env: dict, name: str, merge: str, batch_size: int) -> dict:
    result_file = work / f"result-{name}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out = work / f"out-{name}"
    run_config = [
        f"partition.dir='{work / 'parts'}'",
        f"fed.output-dir='{out}'",
        "fed.task='query'",
        f"fed.min-nodes={CLIENTS}",
        f"query.opted-in-partitions='{','.join(map(str, range(CLIENTS)))}'",
        f"query.merge='{merge}'",
        f"query.batch-size={batch_size}",
        f"query.questions-limit={args.questions}",
        f"query.top-k-per-node={args.top_k_per_node}",
        f"eval.recall-k={args.recall_k}",
        f"eval.top-k={args.prompt_top_k}",
        "runtime.num-threads=2",
        *args.set,
    ]
    flwr, started = str(Path(sys.executable).parent / "flwr"), time.perf_counter()
    try:
        run_id = follow_run.launch_run(
            str(REPO),
            "local",
            run_config,
            flwr=flwr,
            env=env,
            timeout_s=300,
            federation_config=f"num-supernodes={CLIENTS}",
        )
        status = follow_run.wait_for_run("local", run_id, timeout_s=args.timeout, flwr=flwr, env=env)
    finally:
        follow_run.stop_local_superlink(env["FLWR_HOME"])
    if status != follow_run.COMPLETED:
        raise SystemExit(
            f"{name}: run {run_id} ended {status}; `flwr log {run_id} local --show` (FLWR_HOME={env['FLWR_HOME']})"
        )
    metrics = json.loads((out / "query-metrics.json").read_text())
    metrics["submit-to-finish-seconds"] = time.perf_counter() - started
    result_file.write_text(json.dumps(metrics, indent=2))
    return metrics


def union(args, work: Path) -> dict:
    result_file = work / "result-union.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.config.runtime import apply_runtime
    from fedrag_app.config.values import parse_override
    from fedrag_app.federation.query import MergedHit, NodeHit, answer_and_score, load_questions
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.knowledge_store import KnowledgeStore
    from fedrag_app.rag.retriever import load_retriever

    cfg = AppConfig.from_flat(
        {
            "query.questions-limit": args.questions,
            "eval.recall-k": args.recall_k,
            "eval.top-k": args.prompt_top_k,
            "runtime.num-threads": 2,
            **dict(parse_override(item) for item in args.set),  # the federated runs' overrides (e.g. the adapter)
        }
    )
    device = apply_runtime(cfg.runtime)
    gen, retriever = load_generator(cfg.generator, device=device), load_retriever(cfg.retriever, device=device)
    examples = load_questions(cfg)
    depth = max(cfg.eval.top_k, cfg.eval.recall_k)
    t0 = time.perf_counter()
    vectors = retriever.encode_queries([e.question for e in examples]).cpu().numpy()
    t1 = time.perf_counter()
    with KnowledgeStore.open(path=str(work / "union-shard"), embedding_model=retriever.name, dim=retriever.dim) as kb:
        found = kb.search_batch(vectors, depth)
    hits = [
        [
            MergedHit(h.id, h.title, h.text, h.score, (NodeHit(h.id, h.title, h.text, h.score, r, 0),))
            for r, h in enumerate(hs, 1)
        ]
        for hs in found
    ]
    _, metrics = answer_and_score(cfg, gen, examples, hits, {"encode": t1 - t0, "node": time.perf_counter() - t1})
    result_file.write_text(json.dumps(metrics, indent=2))
    return metrics


def table(rows: dict[str, dict], k: int) -> str:
    head = (
        f"| retrieval | n | recall@{k} | MRR@{k} | EM | F1 | s/q total | Flower | node search | server encode | "
        "generation | replies ok / failed |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in rows.items():
        retrieval = m["s-per-question-round-trip"] if "replies-ok" in m else m["s-per-question-node"]
        per_q = m["s-per-question-encode"] + retrieval + m["s-per-question-generation"]
        failed = sum(m.get(f"replies-{p}", 0) for p in ("refused", "error", "invalid", "timeout"))
        replies = f"{m['replies-ok']} / {failed}" if "replies-ok" in m else "-"
        flower = f"{m['s-per-question-flower']:.3f}" if "replies-ok" in m else "-"
        lines.append(
            f"| {name} | {m['questions']} | {m[f'retrieval-recall@{k}']:.3f} | {m[f'retrieval-mrr@{k}']:.3f} | "
            f"{m['wq-em']:.3f} | {m['wq-f1']:.3f} | {per_q:.3f} | {flower} | {m['s-per-question-node']:.3f} | "
            f"{m['s-per-question-encode']:.3f} | {m['s-per-question-generation']:.3f} | {replies} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=30, help="first N Web Questions test questions")
    ap.add_argument("--passages", type=int, default=2000, help="passages in each institution's shard; 0 = all")
    ap.add_argument("--top-k-per-node", type=int, default=10)
    ap.add_argument("--recall-k", type=int, default=10)
    ap.add_argument("--prompt-top-k", type=int, default=2, help="merged passages in the prompt (eval.top-k)")
    ap.add_argument("--batch-size", type=int, default=16, help="questions per query.retrieve message")
    ap.add_argument("--batch-size-compare", type=int, default=1, help="one more RRF run at this batch size; 0 = none")
    ap.add_argument("--steps", default="prepare,federated,union", help="comma-separated subset to run now")
    ap.add_argument("--workdir", default="/tmp/fedrag_bench_federated_query")
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        help="extra run-config override for every row, key=value (TOML value), e.g. "
        "generator.adapter-path='<a RALT adapter folder>' to answer with a fine-tuned generator",
    )
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bin_dir, steps = Path(sys.executable).parent, set(args.steps.split(","))
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FLWR_HOME=str(work / "flwr_home"),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONPATH=str(REPO),
    )
    runs = {
        "federated RRF (k=60)": ("rrf", "rrf", args.batch_size),
        "federated score sort": ("score", "score", args.batch_size),
    }
    if args.batch_size_compare:
        runs[f"federated RRF, {args.batch_size_compare} question(s)/message"] = (
            f"rrf-batch{args.batch_size_compare}",
            "rrf",
            args.batch_size_compare,
        )
    if "prepare" in steps:
        print("== prepare: partitions and the union index", flush=True)
        prepare(args, work, env)
    rows = {}
    for label, (name, merge, batch) in runs.items():
        if "federated" in steps or (work / f"result-{name}.json").exists():
            print(f"== {label}", flush=True)
            rows[label] = federated(args, work, env, name, merge, batch)
    if "union" in steps or (work / "result-union.json").exists():
        print("== one index over the union of the shards", flush=True)
        rows["one union index (centralized)"] = union(args, work)
    manifest = json.loads((work / "parts" / "manifest.json").read_text())
    sizes = ", ".join(str(c["passages"]) for c in manifest["clients"])
    header = (
        f"{args.questions} Web Questions test questions; shards of {sizes} passages; top-{args.top_k_per_node} per "
        f"node; {args.prompt_top_k} merged passages in the prompt; SmolLM2-135M-Instruct + all-MiniLM-L6-v2; "
        f"overrides: {args.set or 'none (base models)'}"
    )
    report = f"{header}\n\n{table(rows, args.recall_k)}\n"
    print(f"\n{report}")
    (work / "table.md").write_text(report)


if __name__ == "__main__":
    main()
