"""After training: `ask` answers question after question with its models loaded once, prints JSON for scripts,
keeps library chatter off the terminal unless --verbose; `export` round-trips through plain transformers and
sentence-transformers to the same greedy answer as `ask` with the adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from fedrag_app.cli import app

Q = "who was the first president of the united states"
QUIET_KEYS = (
    "TQDM_DISABLE",
    "TRANSFORMERS_VERBOSITY",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS",
    "PYTHONWARNINGS",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_DATASETS_DISABLE_PROGRESS_BARS",
    "FEDRAG_VERBOSE",
)


def _env(**extra) -> dict:
    """The test process's environment without any verbosity setting an in-process CLI call left behind."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_KEYS}
    return {**env, **extra}


def test_interactive_ask_answers_each_stdin_line_until_an_empty_one(small_shard_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["ask", "--json", "--store", small_shard_path, "--set", "generator.max-new-tokens=8"],
        input=f"{Q}\nwhat is the capital of france\n\nnever asked\n",
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [x["question"] for x in lines] == [Q, "what is the capital of france"]
    assert all(x["answer"] and len(x["passages"]) == 2 for x in lines)
    assert set(lines[0]["passages"][0]) == {"rank", "id", "score", "title", "text"}
    text = runner.invoke(
        app,
        ["ask", "--store", small_shard_path, "--set", "generator.max-new-tokens=8"],
        input=f"{Q}\nwhat is the capital of france",
    )  # EOF without a newline ends it too
    assert text.exit_code == 0, text.output
    assert f"Q: {Q}" in text.stdout and "Q: what is the capital of france" in text.stdout
    assert text.stdout.count("retrieved passages") == 2


@pytest.mark.slow
def test_library_chatter_only_with_verbose(tmp_path, small_shard_path):
    """A fresh cache converts the packaged GGUF (transformers' per-tensor tqdm bar), loading the weights draws
    transformers' progress bar, and with peft < 0.22 loading PEFT trips transformers' is_gradient_checkpointing
    FutureWarning: none of it reaches a quiet terminal, and --verbose lets the library's bars through."""
    argv = [
        sys.executable,
        "-m",
        "fedrag_app.cli",
        "ask",
        Q,
        "--json",
        "--top-k",
        "1",
        "--store",
        small_shard_path,
        "--set",
        "generator.max-new-tokens=8",
    ]
    quiet = subprocess.run(
        argv, capture_output=True, text=True, timeout=600, env=_env(FEDRAG_CACHE_DIR=str(tmp_path / "cache"))
    )
    assert quiet.returncode == 0, quiet.stderr
    assert (tmp_path / "cache" / "models").exists(), "the GGUF conversion ran"
    chatter = ("is_gradient_checkpointing", "GGUF", "Loading weights")
    assert not [c for c in chatter if c in quiet.stderr], quiet.stderr[-2000:]
    assert json.loads(quiet.stdout)["question"] == Q
    verbose = subprocess.run(argv + ["--verbose"], capture_output=True, text=True, timeout=600, env=_env())
    assert verbose.returncode == 0, verbose.stderr
    assert "Loading weights" in verbose.stderr, verbose.stderr[-2000:]
    assert json.loads(verbose.stdout)["answer"]  # warnings go to stderr: stdout stays one JSON object


def _perturbed_checkpoint(root, store_path):
    """A round checkpoint whose adapter and query encoder both change the output (a fresh LoRA's B is 0, which
    would let an export that forgot the adapter pass)."""
    from fedrag_app.config.app_config import AppConfig, GeneratorConfig, RetrieverConfig
    from fedrag_app.federation.checkpoint import save_checkpoint
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.retriever import load_retriever

    torch.manual_seed(7)
    gen, retriever = load_generator(GeneratorConfig()), load_retriever(RetrieverConfig())
    with torch.no_grad():
        for name, p in gen.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
        for name, p in retriever.query_model.named_parameters():
            if ".layer.5." in name and name.endswith("weight") and p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.02)
    config = {**AppConfig().to_flat(), "store.path": store_path}
    return save_checkpoint(root, 3, gen, retriever, {"wq-f1": 0.5}, config)


def _plain_answer(model, tok, passages: list[dict]) -> str:
    from fedrag_app.rag.prompts import build_prompt, format_passage

    prompt = build_prompt(tok, Q, [format_passage(p["title"], p["text"]) for p in passages])
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=32,
            do_sample=False,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_export_round_trips_to_the_same_answer_as_ask_with_the_adapter(tmp_path, small_shard_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedrag_app.rag.knowledge_store import KnowledgeStore
    from fedrag_app.rag.model_sources import resolve_generator

    ckpt = _perturbed_checkpoint(tmp_path / "fed", small_shard_path)
    runner = CliRunner()
    asked = runner.invoke(
        app,
        [
            "ask",
            Q,
            "--json",
            "--store",
            small_shard_path,
            "--adapter",
            str(ckpt.adapter_dir),
            "--retriever",
            str(ckpt.retriever_dir),
        ],
    )
    assert asked.exit_code == 0, asked.output
    want = json.loads(asked.stdout)
    out = tmp_path / "export"
    done = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "fed"), "--out", str(out)])  # its latest round
    assert done.exit_code == 0, done.output
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")], "no temp folder left behind"

    tok = AutoTokenizer.from_pretrained(out / "generator")
    model = AutoModelForCausalLM.from_pretrained(out / "generator").eval()
    assert not any("lora" in n for n, _ in model.named_parameters()), "a plain model, the adapter merged in"
    assert _plain_answer(model, tok, want["passages"]) == want["answer"]
    base = AutoModelForCausalLM.from_pretrained(resolve_generator("smollm2-135m-instruct")).eval()
    assert _plain_answer(base, tok, want["passages"]) != want["answer"], "the adapter must change the answer"

    query = SentenceTransformer(str(out / "retriever")).encode([Q], normalize_embeddings=True)[0]
    with KnowledgeStore.open(path=small_shard_path) as kb:
        hits = kb.search(query, 2)
    assert [h.id for h in hits] == [p["id"] for p in want["passages"]]
    assert [h.score for h in hits] == pytest.approx([p["score"] for p in want["passages"]], abs=1e-5)
    untrained = SentenceTransformer(str(out / "context-encoder")).encode([Q], normalize_embeddings=True)[0]
    assert float(query @ untrained) < 0.9999, "the exported query encoder is the trained one"

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"] == str(ckpt.path) and manifest["round"] == 3
    assert manifest["generator"]["base-model"] == "smollm2-135m-instruct" and manifest["generator"]["merged"]
    assert manifest["store"]["path"] == small_shard_path and manifest["store"]["found"]
    assert manifest["store"]["manifest"]["embedding_model"] == "all-minilm-l6-v2"
    assert len(manifest["embedding-fingerprint"]["sha256-of-context-encoder-weights"]) == 64
    again = runner.invoke(app, ["export", "--checkpoint", str(ckpt.path), "--out", str(out)])
    assert again.exit_code != 0 and "not empty" in str(again.exception)


def test_export_names_what_is_missing(tmp_path):
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "lacks adapter/adapter_config.json, retriever/dual_encoder.json" in str(result.exception)
    assert not (tmp_path / "x").exists()
