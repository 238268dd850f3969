"""Where a RALT step and an LSR scoring forward spend their time (issue 22): torch.profiler on CPU.

    python benchmarks/profile_train.py                 # one RALT step + one LSR scoring forward, W2/W3 batches
    python benchmarks/profile_train.py --rows 25       # also print the profiler's top ops

Builds the real workload's batches (bench_train.py's store, questions and settings), warms up on one batch,
then profiles one more. Prints the share of CPU time per op family: GEMM (mm/addmm/bmm/linear), attention
(SDPA kernels and their backward), softmax/log-softmax, RMSNorm (pow/mean/rsqrt/mul chains), element-wise,
copies/reshapes, the optimizer, and the rest (Python and dispatch overhead is wall time minus op time).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FAMILIES = (  # first match wins; matched against the lower-cased aten op name
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkl", "mkldnn", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("softmax", ("softmax",)),
    ("optimizer", ("adam", "_foreach", "_fused")),
    (
        "copy/reshape",
        ("copy_", "contiguous", "clone", "cat", "index", "_to_copy", "fill_", "zero_", "empty", "as_strided"),
    ),
    (
        "element-wise",
        (
            "mul",
            "add",
            "pow",
            "rsqrt",
            "mean",
            "silu",
            "neg",
            "div",
            "sum",
            "sub",
            "exp",
            "where",
            "dropout",
            "bernoulli",
            "threshold",
            "sigmoid",
        ),
    ),
)


def family(name: str) -> str:
    name = name.lower()
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other ops"


def breakdown(prof, wall: float) -> dict[str, float]:
    """Seconds of self CPU time per op family (aten ops only, no double counting), plus unattributed wall time."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith("aten::"):
            out[family(evt.key)] += evt.self_cpu_time_total / 1e6
    out["python/dispatch (wall - ops)"] = max(0.0, wall - sum(out.values()))
    return dict(out)


def show(title: str, parts: dict[str, float], wall: float, flops: float, peak: float) -> None:
    print(
        f"\n== {title}: {wall:.2f} s wall, {flops / wall / 1e9:.1f} GFLOP/s useful "
        f"= MFU {flops / wall / 1e9 / peak:.0%} "
        f"of the measured {peak:.0f} GFLOP/s (profiler overhead included)"
    )
    for name, sec in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:30s} {sec:7.3f} s  {sec / wall:6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=0, help="also print the profiler's top-N ops by self CPU time")
    ap.add_argument("--what", choices=["ralt", "lsr", "encode", "both", "all"], default="both")
    ap.add_argument("--encode-batch", type=int, default=16, help="passages per encoding forward (--what encode)")
    ap.add_argument("--set", action="append", default=[], help="run-config override, e.g. ralt.forward-tokens=0")
    args = ap.parse_args()

    import bench_train as bt
    import torch
    from peer_fedrag import peak_rss_mib
    from torch.profiler import ProfilerActivity, profile

    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.config.runtime import apply_runtime
    from fedrag_app.data.loaders import load_web_questions
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.knowledge_store import KnowledgeStore
    from fedrag_app.rag.lm_scoring import answer_logprobs
    from fedrag_app.rag.retrieval import retrieve
    from fedrag_app.rag.retriever import load_retriever
    from fedrag_app.training.lsr import scoring_sequences
    from fedrag_app.training.ralt import accumulate_gradients, build_ralt_sequences, trainable_lora_parameters
    from fedrag_app.training.sequences import collate, make_batches

    cfg = AppConfig.from_flat(
        {
            "runtime.seed": bt.SEED,
            "runtime.num-threads": 2,
            "ralt.batch-size": 4,
            "ralt.top-k": 2,
            "lsr.batch-size": 4,
            "lsr.top-k": 2,
            **dict(kv.split("=", 1) for kv in args.set),
        }
    )
    apply_runtime(cfg.runtime)
    gen, retriever = load_generator(cfg.generator), load_retriever(cfg.retriever)
    examples = load_web_questions("train", cfg.data)[: bt.QUESTIONS]
    with KnowledgeStore.open(path=bt.shard_path(retriever)) as store:
        hits = retrieve(retriever, store, [e.question for e in examples], 2)
    peak = bt.matmul_peak_gflops()
    pad = gen.tokenizer.pad_token_id

    if args.what in ("encode", "all"):
        from bench_store import encode_flops

        from fedrag_app.data.loaders import iter_passages
        from fedrag_app.rag.prompts import format_passage

        texts = [format_passage(p.title, p.text) for p in iter_passages(cfg.data, limit=320)]
        retriever.encode_passages(texts[:64], batch_size=args.encode_batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            retriever.encode_passages(texts[64:], batch_size=args.encode_batch)
            wall = time.perf_counter() - t0
        print(f"\nencode: {len(texts) - 64} passages, batch {args.encode_batch}")
        show("passage encoding", breakdown(prof, wall), wall, encode_flops(retriever.context_model, texts[64:]), peak)
        if args.rows:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

    if args.what in ("ralt", "both", "all"):
        rng = random.Random(bt.SEED)
        batches = make_batches(
            build_ralt_sequences(gen.tokenizer, examples, hits, cfg.ralt, rng), 8, length_grouping=True, rng=rng
        )
        batches.sort(key=lambda b: max(len(s.input_ids) for s in b))
        warm, seqs = batches[len(batches) // 2 - 1], batches[len(batches) // 2]
        batch = collate(seqs, pad, "cpu")
        optimizer = torch.optim.AdamW(trainable_lora_parameters(gen), lr=1e-4, weight_decay=0.0)
        gen.model.train()

        def step(sequences):
            accumulate_gradients(gen, sequences, cfg.ralt.forward_tokens)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        rss_before = peak_rss_mib()
        step(warm)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step(seqs)
            wall = time.perf_counter() - t0
        gen.model.eval()
        print(f"peak RSS after the RALT steps: {peak_rss_mib():.0f} MiB (before them: {rss_before:.0f} MiB)")
        print(f"RALT batch: {tuple(batch['input_ids'].shape)}, {int(batch['attention_mask'].sum())} non-padding tokens")
        show("RALT step", breakdown(prof, wall), wall, bt.ralt_step_flops(gen.model, batch), peak)
        if args.rows:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

    if args.what in ("lsr", "both", "all"):
        seqs = scoring_sequences(gen, examples[:8], hits[:8], cfg.lsr)
        warm, batch = collate(seqs[:8], pad, "cpu"), collate(seqs[8:16], pad, "cpu")
        with torch.no_grad():
            answer_logprobs(gen.model, **warm)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                answer_logprobs(gen.model, **batch)
                wall = time.perf_counter() - t0
        print(
            f"\nLSR batch: {tuple(batch['input_ids'].shape)}, {int(batch['attention_mask'].sum())} non-padding tokens"
        )
        show("LSR scoring forward", breakdown(prof, wall), wall, bt.forward_flops(gen.model, batch), peak)
        if args.rows:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
