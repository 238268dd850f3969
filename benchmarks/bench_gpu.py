"""GPU benchmark (issue 18): this app's own RALT and LSR steps on one GPU, and one federated round on it.

    python benchmarks/bench_gpu.py --tiny            # anywhere, seconds: toy sizes, fp32 on CPU (tests/test_gpu.py)
    python benchmarks/bench_gpu.py                   # CUDA: SmolLM2-135M's and a 1B-class architecture, bf16
    python benchmarks/bench_gpu.py --federated       # + one RALT round of 3 clients: SuperLink + 3 SuperNodes
    python benchmarks/bench_gpu.py --make-assets DIR # here: tokenizers, configs and a data slice (~5 MB) for a
                                                     # machine without the packaged models or the data;
    python benchmarks/bench_gpu.py --federated --assets DIR   # there: random weights from those configs

Models have the real architecture (LlamaForCausalLM) and random weights built from a config: no download and no
tokenizer, and speed does not depend on the weights. Each step is the product's own code: generator.with_lora
(frozen base in the run's dtype, fp32 LoRA r=8 on q/v, as load_generator builds it), ralt.collate,
lm_scoring.answer_nll and AdamW on the LoRA weights. An LSR step = lm_scoring.answer_logprobs over B questions x k
candidates (no grad; the product scores a whole phase at once, the same work) + a query-encoder step on
lsr.lsr_loss (a random BERT of all-MiniLM-L6-v2's shape, mean-pooled, fp32 as in the product).
Prints per model: the device's measured matmul peak in the run's dtype, RALT tokens/s (non-padding) and MFU
(useful FLOPs counted as in bench_train.py / step time / that peak), the LSR step time, and the peak memory of
one client (weights, LoRA, optimizer states, one step's activations, its retriever) with the
client-resources-num-gpus that leaves room for as many clients on this GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import torch  # noqa: E402
from bench_train import ralt_step_flops  # noqa: E402  (the FLOP count every benchmark here uses)

from fedrag_app.core import environment  # noqa: E402

COMMON = dict(
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    head_dim=64,
)
ARCHS = {  # name -> LlamaConfig overrides (SmolLM2's vocabulary, GQA and tied embeddings throughout)
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
    "llama-1b-class": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
}
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)  # all-MiniLM-L6-v2
TINY_BERT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
PAD, ANSWER_TOKENS, QUERY_TOKENS = 2, 8, 16


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, sizes: tuple[int, ...], inner: int, repeats: int) -> float:
    """Best measured square-matmul rate (FLOP/s) of this device in ``dtype``: MFU's denominator."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                a @ b
            sync(device)
            best = max(best, inner * 2 * n**3 / (time.perf_counter() - t0))
        del a, b
    return best


def build_generator(arch: str, device: str, dtype: torch.dtype):
    """The product's generator on a random-weight base: generator.with_lora, LoRA r=8 on q/v (the defaults)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedrag_app.config.app_config import GeneratorConfig
    from fedrag_app.rag.generator import Generator, with_lora

    with torch.device(device):
        base = LlamaForCausalLM(LlamaConfig(**{**COMMON, **ARCHS[arch]}))
    base.to(dtype)
    return Generator(model=with_lora(base, GeneratorConfig()), tokenizer=None, name=arch)


def ralt_batches(n: int, batch: int, seq_len: int, rng: random.Random) -> list:
    """Length-grouped batches of prompt + answer sequences (answer labelled), 85-100% of ralt.max-seq-len long."""
    from fedrag_app.training.sequences import IGNORE, LabelledSequence

    out = []
    for _ in range(n):
        lengths = sorted(rng.randint(int(seq_len * 0.85), seq_len) for _ in range(batch))
        seqs = []
        for length in lengths:
            ids = [rng.randrange(3, COMMON["vocab_size"]) for _ in range(length)]
            seqs.append(LabelledSequence(ids, [IGNORE] * (length - ANSWER_TOKENS) + ids[-ANSWER_TOKENS:]))
        out.append(seqs)
    return out


def ralt(gen, device: str, batches: list, warmup: int) -> dict:
    """RALT steps exactly as ralt.train_ralt runs them; median step time after ``warmup`` steps."""
    from fedrag_app.rag.lm_scoring import answer_nll
    from fedrag_app.training.ralt import trainable_lora_parameters
    from fedrag_app.training.sequences import collate

    optimizer = torch.optim.AdamW(trainable_lora_parameters(gen), lr=1e-4, weight_decay=0.0)
    times, tokens, flops, losses = [], [], [], []
    gen.model.train()
    for i, batch in enumerate(batches):
        sync(device)
        t0 = time.perf_counter()
        inputs = collate(batch, PAD, device)
        loss = answer_nll(gen.model, **inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # train_ralt reads it too (a sync)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(int(inputs["attention_mask"].sum()))
            flops.append(ralt_step_flops(gen.model, inputs))
    gen.model.eval()
    step = statistics.median(times)
    return {
        "step_s": step,
        "tokens_per_s": statistics.median(tokens) / step,
        "flops": statistics.median(flops),
        "loss": losses[-1],
    }


def lsr(gen, device: str, questions: int, top_k: int, seq_len: int, steps: int, warmup: int, tiny: bool) -> dict:
    """LSR steps: LM scores of B x k candidates (no grad), then a query-encoder step on lsr.lsr_loss."""
    import torch.nn.functional as F
    from transformers import BertConfig, BertModel

    from fedrag_app.config.app_config import LsrConfig
    from fedrag_app.rag.lm_scoring import answer_logprobs
    from fedrag_app.training.lsr import lsr_loss
    from fedrag_app.training.sequences import collate

    cfg = LsrConfig()
    rng = random.Random(1)
    with torch.device(device):
        encoder = BertModel(BertConfig(**(TINY_BERT if tiny else MINILM)))  # fp32, as the product's retriever
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    scoring, retriever = [], []
    for i in range(warmup + steps):
        candidates = ralt_batches(1, questions * top_k, seq_len, rng)[0]
        query = torch.randint(3, encoder.config.vocab_size, (questions, QUERY_TOKENS), device=device)
        contexts = F.normalize(torch.randn(questions, top_k, encoder.config.hidden_size, device=device), dim=-1)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            inputs = collate(candidates, PAD, device)
            lm = answer_logprobs(gen.model, **inputs, reduction=cfg.lm_score).float().view(questions, top_k)
        sync(device)
        t1 = time.perf_counter()
        hidden = encoder(input_ids=query, attention_mask=torch.ones_like(query)).last_hidden_state  # (B, T, D)
        q = F.normalize(hidden.mean(dim=1), dim=-1)  # (B, D): mean pooling + normalize, as all-MiniLM-L6-v2
        scores = torch.einsum("bd,bkd->bk", q, contexts)
        loss = lsr_loss(
            scores,
            lm.to(scores),
            retriever_temperature=cfg.retriever_temperature,
            lm_temperature=cfg.lm_temperature,
            kl_direction=cfg.kl_direction,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        sync(device)
        if i >= warmup:
            scoring.append(t1 - t0)
            retriever.append(time.perf_counter() - t1)
    return {"scoring_s": statistics.median(scoring), "retriever_s": statistics.median(retriever)}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def bench_model(arch: str, args, device: str, dtype: torch.dtype, peak: float) -> None:
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    gen = build_generator(arch, device, dtype)
    if cuda:  # the peak from here on starts at what is allocated now (the weights), not at the fp32 init's transient
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    n_params = sum(p.numel() for p in gen.model.parameters())
    print(
        f"\n== {arch}: {n_params / 1e6:.0f}M parameters, {str(dtype).replace('torch.', '')} base, fp32 LoRA on {device}"
    )
    batches = ralt_batches(args.warmup + args.steps, args.batch, args.seq_len, random.Random(0))
    r = ralt(gen, device, batches, args.warmup)
    mfu = r["flops"] / r["step_s"] / peak
    print(
        f"  RALT: {r['step_s'] * 1e3:.1f} ms/step ({args.batch} sequences of <= {args.seq_len} tokens), "
        f"{r['tokens_per_s']:,.0f} tokens/s, MFU {mfu:.1%} (loss {r['loss']:.3f})"
    )
    s = lsr(gen, device, args.lsr_questions, args.lsr_top_k, args.seq_len, args.steps, args.warmup, args.tiny)
    print(
        f"  LSR step: {(s['scoring_s'] + s['retriever_s']) * 1e3:.1f} ms ({args.lsr_questions} questions x "
        f"{args.lsr_top_k} candidates: LM scoring {s['scoring_s'] * 1e3:.1f} ms + query-encoder step "
        f"{s['retriever_s'] * 1e3:.1f} ms)"
    )
    if cuda:
        used, total = torch.cuda.max_memory_allocated(), torch.cuda.get_device_properties(0).total_memory
        fit = max(1, int(0.9 * total // used))
        print(
            f"  peak memory per client: {gib(used)} (allocated: weights, LoRA, AdamW, one step); {fit} fit in 90% "
            f"of {gib(total)} -> client-resources-num-gpus = {math.ceil(100 / min(fit, 100)) / 100:.2f}, less if "
            "the ServerApp's own model shares the GPU (Ray does not count it)"
        )
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"  peak memory per client: n/a without CUDA (this process's peak RSS {gib(rss)})")
    del gen
    if cuda:
        torch.cuda.empty_cache()


# --- one federated round in deployment mode (SuperLink + SuperNodes as local processes; no Ray) ------------------
def make_assets(out: Path, questions: int, passages: int) -> None:
    """Tokenizers and configs of the default models (no weights) and a slice of the data, in the data folder's
    layout (docs/DATA.md)."""
    from fedrag_app.rag.model_sources import resolve_generator, resolve_retriever

    weights = ("*.safetensors", "*.bin", "*.gguf", "README.md", ".gitattributes")
    skip = shutil.ignore_patterns(*weights)
    shutil.copytree(resolve_generator("smollm2-135m-instruct"), out / "generator", ignore=skip)
    shutil.copytree(resolve_retriever("all-minilm-l6-v2"), out / "retriever", ignore=skip)
    src = Path(environment.data_dir() or sys.exit("make_assets needs $FEDRAG_DATA_DIR (the data to slice)"))
    for rel, n in (("web_questions/train.jsonl", questions), ("wikipedia/passages.jsonl", passages)):
        (out / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        with (src / rel).open() as f, (out / "data" / rel).open("w") as g:
            g.writelines(line for _, line in zip(range(n), f))
    print(f"assets in {out}: {sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 1e6:.1f} MB")


def materialize(assets: Path, work: Path) -> tuple[str, str, Path]:
    """Random weights of the real architectures beside the carried tokenizers (speed does not need trained ones)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    gen_dir, retr_dir = work / "generator", work / "retriever"
    shutil.copytree(assets / "generator", gen_dir)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(gen_dir)).save_pretrained(gen_dir)
    shutil.copytree(assets / "retriever", retr_dir)
    AutoModel.from_config(AutoConfig.from_pretrained(retr_dir)).save_pretrained(retr_dir)
    return str(gen_dir), str(retr_dir), assets / "data"


def federated_round(args, device: str) -> None:
    """Three institutions on this machine, each a SuperNode with its own questions and Qdrant shard, and a
    SuperLink (TLS and node authentication, via tests/deploy_helpers.py); one RALT round of the real app."""
    import subprocess

    from tests.deploy_helpers import Federation

    work = Path(tempfile.mkdtemp(prefix="fedrag_bench_gpu_"))
    gen_model, retr_model = "smollm2-135m-instruct", "all-minilm-l6-v2"
    data_dir = Path(environment.data_dir())
    if args.assets:
        gen_model, retr_model, data_dir = materialize(Path(args.assets).resolve(), work)
    os.environ[environment.DATA_DIR] = str(data_dir)
    models = [f"generator.model={gen_model}", f"retriever.model={retr_model}"]
    shard = work / "template-shard"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedrag_app.cli",
            "index",
            str(data_dir / "wikipedia"),
            "--limit",
            str(args.fed_passages),
            "--store",
            str(shard),
            *[x for m in models for x in ("--set", m)],
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (data_dir / "web_questions" / "train.jsonl").read_text().splitlines()
    (work / "federation").mkdir()
    fed = Federation(work / "federation")
    fed.env.update({environment.DATA_DIR: str(data_dir), "PYTHONPATH": str(REPO)})
    names = [f"institution-{i}" for i in range(args.fed_clients)]
    out = work / "outputs"
    try:
        fed.create_credentials()
        fed.start_superlink()
        for i, name in enumerate(names):
            node_dir = work / "data" / name
            node_dir.mkdir(parents=True)
            q = args.fed_questions
            (node_dir / "train.jsonl").write_text("\n".join(lines[i * q : (i + 1) * q]) + "\n")
            shutil.copytree(shard, node_dir / "shard")
            fed.add_node(
                name,
                {
                    "partition-id": i,
                    "num-partitions": len(names),
                    "data-path": str(node_dir / "train.jsonl"),
                    "store-path": str(node_dir / "shard"),
                },
            )
        fed.wait_online(names)
        run_config = {
            "runtime.device": device,
            "generator.model": gen_model,
            "retriever.model": retr_model,
            "train.mode": "ralt",
            "train.max-steps": args.fed_steps,
            "store.passages-limit": args.fed_passages,
            "fed.num-server-rounds": 1,
            "fed.min-nodes": len(names),
            "fed.server-eval": False,
            "fed.fraction-evaluate": 0.0,
            "fed.output-dir": str(out),
        }
        started = time.perf_counter()
        run_id = fed.launch(run_config)
        status = fed.wait_run(run_id, timeout_s=args.fed_timeout)
        print(
            f"\n== federated: {len(names)} SuperNodes + SuperLink on {device}, 1 RALT round of {args.fed_steps} "
            f"steps each: {status}, {time.perf_counter() - started:.1f} s from submit to finish"
        )
        if status != "finished:completed":
            raise SystemExit(f"the federated run did not complete; ServerApp log:\n{fed.run_log(run_id)[-4000:]}")
        for row in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()):
            print(
                f"  round {row['round']}: training phase {row['round-train-seconds']:.1f} s; clients in the handler "
                f"{row['round-handler-seconds-sum']:.1f} s (each message is a fresh ClientApp process: model load, "
                f"unpack, RALT, pack), of which RALT {row['round-local-seconds-sum']:.1f} s"
            )
    finally:
        fed.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes, fp32 on CPU: the same code in seconds")
    ap.add_argument("--device", default="", help="cuda | cpu; default: cuda when present (cpu with --tiny)")
    ap.add_argument("--dtype", default="", help="bfloat16 | float32; default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--models", default="smollm2-135m,llama-1b-class", help=f"comma-separated, of {list(ARCHS)}")
    ap.add_argument("--batch", type=int, default=32, help="RALT sequences per step (ralt.batch-size x ralt.top-k)")
    ap.add_argument("--seq-len", type=int, default=512, help="ralt.max-seq-len / lsr.max-seq-len")
    ap.add_argument("--lsr-questions", type=int, default=4, help="lsr.batch-size")
    ap.add_argument("--lsr-top-k", type=int, default=4, help="lsr.top-k")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--federated", action="store_true", help="also one round of 3 clients in deployment mode")
    ap.add_argument("--fed-clients", type=int, default=3)
    ap.add_argument("--fed-questions", type=int, default=8, help="training questions per institution")
    ap.add_argument("--fed-passages", type=int, default=64, help="passages in each institution's shard")
    ap.add_argument("--fed-steps", type=int, default=2, help="RALT steps per client in the round")
    ap.add_argument("--fed-timeout", type=float, default=900)
    ap.add_argument("--assets", default="", help="folder from --make-assets: random-weight models + data slice")
    ap.add_argument("--make-assets", default="", help="write tokenizers, configs and a data slice here, and exit")
    ap.add_argument("--keep", action="store_true", help="keep the federated run's work folder")
    args = ap.parse_args()
    if args.make_assets:
        make_assets(Path(args.make_assets).resolve(), 3 * args.fed_questions, 4 * args.fed_passages)
        return
    if args.tiny:
        args.models, args.batch, args.seq_len, args.steps, args.warmup = "tiny", 4, 64, 3, 1
        args.lsr_questions, args.lsr_top_k = 2, 2
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    ]
    cuda = device.startswith("cuda")
    where = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}")
    peak = matmul_peak(device, dtype, (4096, 8192) if cuda else (256, 512), 20 if cuda else 4, 5 if cuda else 3)
    print(f"matmul peak ({str(dtype).replace('torch.', '')}, measured): {peak / 1e12:.3f} TFLOP/s")
    for arch in args.models.split(","):
        bench_model(arch.strip(), args, device, dtype, peak)
    if args.federated:
        federated_round(args, device)


if __name__ == "__main__":
    main()
