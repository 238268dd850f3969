"""Tiny random-initialised models of the real architectures, for orchestration tests (Flower plumbing, deployment,
fault handling, the experiment runner, the quickstart).

They keep everything those tests prove about processes, records, checkpoints and shards: the same classes
(LlamaForCausalLM with SmolLM2's tokenizer, a BERT sentence-transformers folder with MiniLM's tokenizer, pooling and
normalisation), the same LoRA targets and trainable encoder layers, loaded through the same code paths as local
folders. Only the widths shrink, so a round costs milliseconds instead of minutes. Maths tests keep the real models.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

VERSION = 2  # bump when the recipe changes: the folders are cached by it


def _generator(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedrag_app.rag.model_sources import resolve_generator

    real = Path(resolve_generator("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(real)
    real_cfg = json.loads((real / "config.json").read_text())
    cfg = LlamaConfig(
        vocab_size=real_cfg["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # untied, unlike SmolLM2: a random tied head makes greedy decoding repeat the prompt's last token (the
        # chat template's newline), an empty answer; a head of its own answers with words
        tie_word_embeddings=False,
        bos_token_id=real_cfg.get("bos_token_id"),
        eos_token_id=real_cfg.get("eos_token_id"),
        pad_token_id=real_cfg.get("pad_token_id"),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    for extra in ("chat_template.jinja", "generation_config.json"):
        if (real / extra).exists():
            shutil.copy(real / extra, out / extra)


def _retriever(out: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedrag_app.rag.model_sources import resolve_retriever

    real = Path(resolve_retriever("all-minilm-l6-v2"))
    tok = AutoTokenizer.from_pretrained(real)
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
        )
    )
    staging = out.parent / f".{out.name}.bert"
    bert.save_pretrained(staging)
    tok.save_pretrained(staging)
    word = models.Transformer(str(staging), max_seq_length=256)
    SentenceTransformer(modules=[word, models.Pooling(32, pooling_mode="mean"), models.Normalize()]).save(str(out))
    shutil.rmtree(staging)


def tiny_models(root: str | os.PathLike | None = None) -> tuple[str, str]:
    """(generator folder, retriever folder), built once per VERSION under ``root`` (default: the app's cache)."""
    from fedrag_app.core.atomic import atomic_dir, build_lock
    from fedrag_app.rag.model_sources import cache_dir

    base = Path(root) if root else cache_dir() / "tiny-test-models"
    folder = base / f"v{VERSION}"
    with build_lock(folder):  # test workers starting at once build it once
        if not (folder / "done").exists():
            with atomic_dir(folder) as staging:
                _generator(staging / "generator")
                _retriever(staging / "retriever")
                (staging / "done").write_text("ok\n")
    return str(folder / "generator"), str(folder / "retriever")


if __name__ == "__main__":
    print(tiny_models())
