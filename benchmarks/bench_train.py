"""Training benchmark (issue 3): RALT and LSR on the FedRAG W2/W3 workload, ours beside the FedRAG library.

    python benchmarks/bench_train.py                       # ours only
    python benchmarks/bench_train.py --peer ../peer-venv/bin/python --repeats 2   # + fed-rag, interleaved

Workload (W2/W3 of the peer benchmark, docs/PERFORMANCE.md): the first 64 Web Questions train pairs (answers joined
with ", "), a store of the first 5,000 Wikipedia passages, top-k 2, batch 4, 16 steps, lr 1e-4, fp32, 2 threads,
seed 1234. Each workload runs in its own process (peak RSS is per process). Prints, per workload: seconds/step (median
of steps 2..N, and whole phase / steps, which includes retrieval and LSR's LM scoring), RALT non-padding
tokens/s, peak RSS, the machine's measured fp32 matmul rate, the model FLOPs utilisation reached, and the
ratio to fed-rag measured in the same run (benchmarks/peer_fedrag.py under the peer's own virtualenv).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
SEED, QUESTIONS, PASSAGES = 1234, 64, 5000


def matmul_peak_gflops(sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 4) -> float:
    """Best fp32 matmul rate of this machine on the configured threads over a few sizes (the denominator of MFU)."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        seconds = min(_timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(repeats))
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def linear_params(model) -> int:
    """Parameters of the decoder's matrix multiplies (embedding and LM head excluded)."""
    import torch

    return sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n and "lora_" not in n
    )


def ralt_step_flops(model, inputs, *, head_everywhere: bool = False) -> float:
    """Useful FLOPs of one RALT step: frozen linears (forward + input-gradient = 2 x 2N per token), causal
    attention (forward + backward = 3 x), and the LM head at answer positions only (2 x). ``head_everywhere``:
    the head at every non-padding position, as fed-rag's step computes it (its loss covers the prompt too)."""
    cfg = model.config
    n = linear_params(model)
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    answers = sum(lengths) if head_everywhere else int((inputs["labels"] != -100).sum())
    tokens = sum(lengths)
    attention = sum(2 * L * L * cfg.hidden_size for L in lengths) * cfg.num_hidden_layers  # QK^T + AV, causal half
    head = 2 * cfg.hidden_size * cfg.vocab_size * answers
    return 4 * n * tokens + 3 * attention + 2 * head


def forward_flops(model, inputs, shared: int = 0) -> float:
    """Useful FLOPs of one no-grad scoring forward: linears, causal attention, LM head at answer positions.
    ``shared``: leading tokens common to all rows, run once (lm_scoring's shared prefix), not once per row."""
    cfg = model.config
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    answers = int((inputs["labels"] != -100).sum())
    tokens = sum(L - shared for L in lengths) + shared
    causal = sum(L * L - shared * shared for L in lengths) + shared * shared  # the suffix still attends to the prefix
    attention = 2 * causal * cfg.hidden_size * cfg.num_hidden_layers
    return 2 * linear_params(model) * tokens + attention + 2 * cfg.hidden_size * cfg.vocab_size * answers


class ScoringMeter:
    """Times LSR's LM scoring and counts its FLOPs (wraps fedrag_app.training.lsr's own functions; the maths is
    untouched)."""

    def __init__(self, gen):
        import fedrag_app.training.lsr as lsr
        from fedrag_app.rag.lm_scoring import shared_prefix_length

        self.gen, self.seconds, self.flops, self.tokens = gen, 0.0, 0.0, 0
        collate, scores = lsr.collate, lsr.lm_scores

        def counted_collate(*args, **kwargs):
            inputs = collate(*args, **kwargs)
            shared = shared_prefix_length(inputs["input_ids"], inputs["labels"])  # lm_scores runs it once
            self.flops += forward_flops(gen.model, inputs, shared)
            self.tokens += int(inputs["attention_mask"].sum())
            return inputs

        def timed_scores(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return scores(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        lsr.collate, lsr.lm_scores = counted_collate, timed_scores


def digest(state: dict) -> str:
    """sha256 over a state dict's tensors in key order: did training change the weights?"""
    return hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(state.items()))).hexdigest()


def shard_path(retriever) -> str:
    """The 5,000-passage Qdrant Edge shard, built once and cached."""
    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.data.loaders import iter_passages
    from fedrag_app.rag.ingest import build_shard
    from fedrag_app.rag.store_location import store_location

    cfg = AppConfig.from_flat({"store.passages-limit": PASSAGES})
    path = store_location(cfg)["path"]
    if not (Path(path) / "manifest.json").exists():
        build_shard(list(iter_passages(cfg.data, limit=PASSAGES)), retriever, path=path, progress=True)
    return path


def run_ours(workload: str, steps: int, overrides: list[str] = ()) -> dict:
    import torch
    from peer_fedrag import peak_rss_mib  # same folder; the measure the peer reports too

    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.config.runtime import apply_runtime
    from fedrag_app.config.values import parse_override
    from fedrag_app.data.loaders import load_web_questions
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.knowledge_store import KnowledgeStore
    from fedrag_app.rag.retriever import load_retriever
    from fedrag_app.training.lsr import train_lsr
    from fedrag_app.training.ralt import train_ralt

    cfg = AppConfig.from_flat(
        {
            "runtime.seed": SEED,
            "runtime.num-threads": 2,
            "ralt.batch-size": 4,
            "ralt.top-k": 2,
            "ralt.learning-rate": 1e-4,
            "lsr.batch-size": 4,
            "lsr.top-k": 2,
            "lsr.learning-rate": 1e-4,
            **dict(parse_override(kv) for kv in overrides),  # values read as TOML, as `fedrag-app --set` does
        }
    )
    apply_runtime(cfg.runtime)
    gen, retriever = load_generator(cfg.generator), load_retriever(cfg.retriever)
    path = shard_path(retriever)
    examples = load_web_questions("train", cfg.data)[:QUESTIONS]
    peak = matmul_peak_gflops()
    marks, tokens, flops = [], [], []

    def on_step(step: int, loss: float, inputs: dict | None) -> None:
        marks.append(time.perf_counter())
        if inputs is not None:
            tokens.append(int(inputs["attention_mask"].sum()))
            flops.append(ralt_step_flops(gen.model, inputs))

    meter = ScoringMeter(gen) if workload == "lsr" else None
    before = digest(retriever.trainable_state_dict())
    with KnowledgeStore.open(path=path) as store:
        t0 = time.perf_counter()
        if workload == "ralt":
            metrics = train_ralt(gen, retriever, store, examples, cfg.ralt, max_steps=steps, seed=SEED, on_step=on_step)
        else:
            metrics = train_lsr(gen, retriever, store, examples, cfg.lsr, max_steps=steps, seed=SEED, on_step=on_step)
        total = time.perf_counter() - t0
    after = digest(retriever.trainable_state_dict())
    intervals = [b - a for a, b in zip(marks, marks[1:])]  # step 1 excluded, as for the peer
    out = {
        "system": "fedrag_app",
        "workload": workload,
        "steps": len(marks),
        "seconds_total": total,
        "s_per_step_median": statistics.median(intervals),
        "s_per_step_whole_phase": total / len(marks),
        "peak_rss_mib": peak_rss_mib(),
        "matmul_peak_gflops": peak,
        "loss_first": metrics[f"{workload}-loss-first"],
        "loss_last": metrics[f"{workload}-loss-last"],
        "torch_threads": torch.get_num_threads(),
        "forward_tokens": cfg.ralt.forward_tokens,
    }
    if workload == "ralt":
        timed = sum(intervals)
        out["tokens_per_s"] = sum(tokens[1:]) / timed
        out["tokens_per_step_median"] = statistics.median(tokens)
        out["achieved_gflops"] = sum(flops[1:]) / timed / 1e9
        out["mfu"] = out["achieved_gflops"] / peak
    else:
        out["retriever_changed"] = before != after
        out["lm_scoring_seconds"] = meter.seconds
        out["lm_scoring_tokens_per_s"] = meter.tokens / meter.seconds  # non-padding tokens scored
        out["achieved_gflops"] = meter.flops / meter.seconds / 1e9
        out["mfu"] = out["achieved_gflops"] / peak  # of the LM scoring, 97% of the phase
    return out


def in_subprocess(python: str, script: Path, workload: str, steps: int, *extra: str) -> dict:
    done = subprocess.run(
        [python, str(script), "--workload", workload, "--steps", str(steps), *extra],
        capture_output=True,
        text=True,
        cwd=HERE.parent,
    )
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict]) -> None:
    for workload in ("ralt", "lsr"):
        ours = [r for r in rows if r.get("workload") == workload and r.get("system") == "fedrag_app"]
        peer = [
            r for r in rows if r.get("workload") == workload and r.get("system") != "fedrag_app" and "error" not in r
        ]
        if not ours:
            continue
        med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"\n== {workload.upper()} ({len(ours)} run(s) ours, {len(peer)} peer)")
        rss = med(ours, "peak_rss_mib")
        whole = med(ours, "s_per_step_whole_phase")
        print(
            f"  ours: {med(ours, 's_per_step_median'):.2f} s/step median (whole phase {whole:.2f}),"
            f" peak RSS {rss:.0f} MiB, loss {ours[0]['loss_first']:.4f} -> {ours[0]['loss_last']:.4f}"
            + (
                f" (ralt.forward-tokens {ours[0]['forward_tokens']};"
                f" target <= 3072 MiB: {'met' if rss <= 3072 else 'NOT met'})"
                if workload == "ralt"
                else ""
            )
        )
        peak, gflops, mfu = med(ours, "matmul_peak_gflops"), med(ours, "achieved_gflops"), med(ours, "mfu")
        if workload == "ralt":
            print(
                f"  ours: {med(ours, 'tokens_per_s'):.0f} non-padding tokens/s, {gflops:.0f} GFLOP/s"
                f" of a measured fp32 matmul peak {peak:.0f} GFLOP/s -> MFU {mfu:.0%} (target >= 65%)"
            )
        else:
            print(
                f"  ours: retriever weights changed: {ours[0]['retriever_changed']}; LM scoring "
                f"{med(ours, 'lm_scoring_seconds'):.1f} s of the phase ({med(ours, 'lm_scoring_tokens_per_s'):.0f}"
                f" tokens/s) at {gflops:.0f} GFLOP/s of a "
                f"measured fp32 matmul peak {peak:.0f} GFLOP/s -> MFU {mfu:.0%} (target >= 65%)"
            )
        if peer:
            key = "tokens_per_s" if workload == "ralt" else None
            print(
                f"  fed-rag: {med(peer, 's_per_step_median'):.2f} s/step median,"
                f" peak RSS {med(peer, 'peak_rss_mib'):.0f} MiB"
                + (
                    f", {med(peer, 'tokens_per_s'):.0f} tokens/s, {med(peer, 'achieved_gflops'):.0f} GFLOP/s of its"
                    f" measured {med(peer, 'matmul_peak_gflops'):.0f} -> MFU {med(peer, 'mfu'):.0%}"
                    f" (its own FLOPs: LM head at every position)"
                    if key
                    else f", retriever changed: {peer[0].get('retriever_changed')}"
                )
            )
            ratio = (
                med(ours, key) / med(peer, key)
                if key
                else med(peer, "s_per_step_median") / med(ours, "s_per_step_whole_phase")
            )
            print(f"  ratio (ours / fed-rag throughput, same run): {ratio:.2f}x")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"\n(a run failed: {r['error'][-400:]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["ralt", "lsr", "both"], default="both")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--peer", default="", help="python of a virtualenv with fed-rag==0.0.27 (runs benchmarks/peer_fedrag.py)"
    )
    ap.add_argument("--json", default="", help="also write every run's figures here")
    ap.add_argument(
        "--set", action="append", default=[], help="run-config override for ours, e.g. ralt.forward-tokens=0"
    )
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_ours(args.workload, args.steps, args.set)))
        return
    rows = []
    for _ in range(args.repeats):
        for workload in ["ralt", "lsr"] if args.workload == "both" else [args.workload]:
            rows.append(
                in_subprocess(
                    sys.executable, Path(__file__), workload, args.steps, "--one", *(f"--set={kv}" for kv in args.set)
                )
            )
            if args.peer:
                peer = in_subprocess(args.peer, HERE / "peer_fedrag.py", workload, args.steps)
                rows.append({**peer, "system": "fed-rag", "workload": workload})
            print(json.dumps(rows[-1])[:300], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    report(rows)


if __name__ == "__main__":
    main()
