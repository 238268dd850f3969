"""The one-GPU path, built and tested on CPU: a bf16 and a 4-bit generator of the real architecture (LlamaForCausalLM,
tiny, random weights, the real SmolLM2 tokenizer) through load_generator, one real RALT and LSR step each, what
travels over Flower, the GPU simulation settings docs/GPU.md gives, and benchmarks/bench_gpu.py --tiny.
Tests marked gpu run the same code on CUDA and are skipped without it; CI covers the code in fp32 and bf16 on CPU.
On a machine without the packaged models (a lent GPU box), FEDRAG_TOKENIZER_FROM names a folder holding the SmolLM2
tokenizer (`benchmarks/bench_gpu.py --make-assets DIR` writes DIR/generator); the gpu tests need no Flower.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrag_app.config.app_config import AppConfig, DataConfig, GeneratorConfig
from fedrag_app.config.runtime import resolve_dtype
from fedrag_app.core.errors import ConfigError
from fedrag_app.core.torch_runtime import release_memory
from fedrag_app.data.loaders import QAExample, iter_passages
from fedrag_app.federation.exchange import exchanged_weights, load_exchanged_weights
from fedrag_app.rag.generator import load_generator, load_tokenizer
from fedrag_app.rag.knowledge_store import KnowledgeStore
from fedrag_app.rag.lm_scoring import answer_nll
from fedrag_app.rag.prompts import format_passage
from fedrag_app.rag.retriever import load_retriever
from fedrag_app.training.lsr import train_lsr
from fedrag_app.training.ralt import train_ralt, trainable_lora_parameters
from fedrag_app.training.sequences import build_sequence, collate

REPO = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# SmolLM2's layout (GQA, tied embeddings, its vocabulary) at toy width: bf16 matmuls are slow on this CPU.
TINY = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
EXAMPLES = [
    QAExample(str(i), q, (a,), "")
    for i, (q, a) in enumerate(
        [
            ("what is the name of justin bieber brother?", "Jaxon Bieber"),
            ("who was the first president?", "George Washington"),
        ]
    )
]
PASSAGE = format_passage("George Washington", "George Washington was the first president of the United States.")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-initialised LlamaForCausalLM saved with the real SmolLM2 tokenizer: generator.model accepts it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    tokenizer_from = os.environ.get("FEDRAG_TOKENIZER_FROM", "smollm2-135m-instruct")
    load_tokenizer(GeneratorConfig(model=tokenizer_from)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_shard(tmp_path_factory, retriever, data_dir) -> str:
    from fedrag_app.rag.ingest import build_shard

    path = tmp_path_factory.mktemp("shard") / "wiki16"
    build_shard(list(iter_passages(DataConfig(dir=str(data_dir)), limit=16)), retriever, path=str(path), progress=False)
    return str(path)


def one_batch(gen) -> dict[str, torch.Tensor]:
    seqs = [build_sequence(gen.tokenizer, ex.question, PASSAGE, ex.target, 96) for ex in EXAMPLES]
    return collate(seqs, gen.tokenizer.pad_token_id, gen.device)


def test_dtype_auto_is_fp32_on_cpu_and_bad_values_are_named():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="generator.dtype"):
        AppConfig.from_flat({"generator.dtype": "float16"})
    assert AppConfig.from_flat({}).generator.dtype == "auto"


def test_bf16_base_trains_fp32_lora_only_and_sends_fp32(tiny_model_dir, tiny_shard):
    from fedrag_app.federation.exchange import outgoing_state, split_state, to_wire_update

    cfg = AppConfig.from_flat(
        {
            "generator.model": str(tiny_model_dir),
            "generator.dtype": "bfloat16",
            "train.mode": "ra-dit",
            "ralt.batch-size": 2,
            "ralt.top-k": 1,
            "ralt.max-seq-len": 128,
            "lsr.batch-size": 2,
            "lsr.top-k": 2,
            "lsr.max-seq-len": 128,
        }
    )
    gen = load_generator(cfg.generator, device="cpu")
    base = gen.model.get_base_model()
    frozen = base.model.layers[0].self_attn.q_proj.base_layer.weight
    assert frozen.dtype == torch.bfloat16 and base.model.embed_tokens.weight.dtype == torch.bfloat16
    trainable = {n: p for n, p in gen.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())

    loss = answer_nll(gen.model, **one_batch(gen))  # gradients: LoRA only, fp32, finite
    loss.backward()
    grads = {n: p.grad for n, p in gen.model.named_parameters() if p.grad is not None}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert set(grads) == set(trainable)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)
    gen.model.zero_grad(set_to_none=True)

    frozen_before = frozen.detach().clone()
    retriever = load_retriever(cfg.retriever)
    with KnowledgeStore.open(path=tiny_shard) as store:
        ralt = train_ralt(gen, retriever, store, EXAMPLES, cfg.ralt, max_steps=1)
        lsr = train_lsr(gen, retriever, store, EXAMPLES, cfg.lsr, max_steps=1)
    assert ralt["ralt-steps"] == 1 and np.isfinite(ralt["ralt-loss-first"]) and ralt["ralt-loss-first"] > 0
    assert lsr["lsr-steps"] == 1 and np.isfinite(lsr["lsr-loss-first"])
    assert torch.equal(frozen, frozen_before), "the bf16 base must stay frozen"
    assert any(p.abs().sum() > 0 for n, p in trainable.items() if ".lora_B." in n), "RALT must move LoRA B"

    sent = outgoing_state(cfg, gen, retriever)
    for wire in ("float32", "float16"):  # what travels: fp32 LoRA (never bf16), the retriever update in its wire dtype
        dtypes = {k.split(".")[0]: v.dtype for k, v in to_wire_update(sent, sent, wire).items()}
        assert dtypes == {"lora": np.float32, "retriever": np.dtype(wire)}
    lora, retr = split_state(sent, *exchanged_weights(cfg, gen, retriever))
    load_exchanged_weights(cfg, gen, retriever, lora, retr)
    assert all(p.dtype == torch.float32 for p in trainable_lora_parameters(gen))


def test_qlora_4bit_on_cpu_trains_and_lowers_the_loss(tiny_model_dir):
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), quantization="4bit", lora_dropout=0.0))
    assert any(type(m).__name__ == "Linear4bit" for m in gen.model.modules())
    params = trainable_lora_parameters(gen)  # asserts nothing but LoRA trains
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    inputs = one_batch(gen)
    gen.model.train()
    losses = []
    for _ in range(3):
        loss = answer_nll(gen.model, **inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(answer_nll(gen.model, **inputs).item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.01, losses


def test_qlora_on_a_bf16_base_keeps_norms_in_fp32(tiny_model_dir):
    """prepare_model_for_kbit_training: what is not 4-bit (norms, embeddings) computes in fp32."""
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), quantization="4bit", dtype="bfloat16"))
    base = gen.model.get_base_model()
    assert base.model.norm.weight.dtype == torch.float32 and base.model.embed_tokens.weight.dtype == torch.float32
    assert torch.isfinite(answer_nll(gen.model, **one_batch(gen)))


def _readme_block(marker: str) -> str:
    readme = (REPO / "docs" / "GPU.md").read_text()
    blocks = re.findall(r"```(?:toml|bash)\n(.*?)```", readme, flags=re.S)
    found = [b for b in blocks if marker in b]
    assert found, f"docs/GPU.md has no code block with {marker!r}"
    return found[0]


def test_readme_gpu_simulation_settings_are_what_flwr_reads():
    """docs/GPU.md's per-run --federation-config and its local-simulation-gpu connection both reach Flower's Ray
    backend as 3 SuperNodes with 4 CPUs and a quarter GPU each (flwr's own parsers, as `flwr run` and
    flwr-simulation call them)."""
    from flwr.cli.flower_config import parse_superlink_connection
    from flwr.cli.run.run import _parse_federation_config_overrides
    from flwr.simulation.app import _run_simulation_settings

    want = (3, "ray", {"client_resources": {"num_cpus": 4, "num_gpus": 0.25}, "init_args": {}}, False, False)
    command = _readme_block("client-resources-num-gpus")
    overrides = re.search(r'--federation-config "([^"]+)"', command).group(1)
    local = parse_superlink_connection({"address": ":local:"}, "local")
    assert _run_simulation_settings(_parse_federation_config_overrides([overrides], local)) == want
    table = tomllib.loads(_readme_block("[superlink.local-simulation-gpu]"))["superlink"]["local-simulation-gpu"]
    conn = parse_superlink_connection(table, "local-simulation-gpu")
    assert conn.address == ":local:"
    assert _run_simulation_settings(_parse_federation_config_overrides(None, conn)) == want


def test_bench_gpu_tiny_runs_on_cpu():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for what in ("matmul peak", "RALT", "tokens/s", "MFU", "LSR step", "peak memory per client"):
        assert what in done.stdout, f"{what!r} missing from:\n{done.stdout}"
    assert "nan" not in done.stdout.lower()


@cuda
@pytest.mark.gpu
def test_cuda_auto_is_bf16_and_one_step_trains(tiny_model_dir):
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir)), device="cuda")
    assert gen.model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    params = trainable_lora_parameters(gen)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in params)
    loss = answer_nll(gen.model, **one_batch(gen))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


@cuda
@pytest.mark.gpu
def test_cuda_qlora_loads_4bit(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), quantization="4bit"), device="cuda")
    assert any(type(m).__name__ == "Linear4bit" for m in gen.model.modules())
    assert torch.isfinite(answer_nll(gen.model, **one_batch(gen)))


@cuda
@pytest.mark.gpu
def test_release_memory_returns_cached_blocks():
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    del x
    reserved = torch.cuda.memory_reserved()
    release_memory()
    assert torch.cuda.memory_reserved() < reserved
