"""LoRA stays fp32 on a bf16 base on every path that makes an adapter (PEFT's autocast_adapter_dtype, no cast of
our own): fresh, reloaded from a saved folder, and a node's personal adapter stacked on the global one."""

from __future__ import annotations

import torch

from fedrag_app.config.app_config import GeneratorConfig
from fedrag_app.rag.generator import PERSONAL, attach_personal_adapter, load_generator, save_adapter


def _trainable(gen) -> dict[str, torch.Tensor]:
    return {n: p for n, p in gen.model.named_parameters() if p.requires_grad}


def test_lora_is_fp32_on_a_bf16_base_fresh_reloaded_and_personal(tiny_models_config, tmp_path):
    cfg = GeneratorConfig(model=tiny_models_config["generator.model"], dtype="bfloat16")
    gen = load_generator(cfg, device="cpu")
    base_weight = gen.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert base_weight.dtype == torch.bfloat16
    fresh = _trainable(gen)
    assert fresh and all("lora_" in n and p.dtype == torch.float32 for n, p in fresh.items())

    save_adapter(gen, tmp_path / "adapter")
    reloaded = load_generator(cfg, device="cpu", adapter_path=str(tmp_path / "adapter"))
    assert {n: p.dtype for n, p in _trainable(reloaded).items()} == {n: p.dtype for n, p in fresh.items()}

    attach_personal_adapter(reloaded, cfg, None, seed=1)
    trainable = _trainable(reloaded)
    assert any(f".{PERSONAL}." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
