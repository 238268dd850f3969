"""The generator: a causal LM with a LoRA adapter (PEFT), optionally on a 4-/8-bit base (QLoRA).

Only the adapter trains and travels; the base stays frozen. The adapter is created fresh from the config or
loaded *trainable* from a PEFT folder (``is_trainable=True``: PEFT's default loads it frozen).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fedrag_app.config.app_config import GeneratorConfig
from fedrag_app.config.runtime import resolve_dtype
from fedrag_app.core.atomic import atomic_dir
from fedrag_app.core.errors import ConfigError, WeightsError
from fedrag_app.rag.model_sources import resolve_generator


@dataclass
class Generator:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _quantization_config(cfg: GeneratorConfig, compute_dtype: torch.dtype):
    if cfg.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"generator.quantization = '{cfg.quantization}' needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(cfg: GeneratorConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_generator(cfg.model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_generator(
    cfg: GeneratorConfig, *, device: str = "cpu", adapter_path: str | None = None, dtype: torch.dtype | None = None
) -> Generator:
    """Base LM (frozen, in ``generator.dtype``) + LoRA (fp32): from ``adapter_path`` / ``cfg.adapter_path`` if
    given, else fresh from the config."""
    source = resolve_generator(cfg.model)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    quant = _quantization_config(cfg, dtype)
    kwargs = {"dtype": dtype}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    try:
        base = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (RuntimeError, ValueError, ImportError, NotImplementedError) as e:
        if quant is None:
            raise
        raise ConfigError(
            f"generator.quantization = '{cfg.quantization}': bitsandbytes cannot load {cfg.model!r} "
            f"on {device} ({type(e).__name__}: {e}); use 'none'"
        ) from e
    if quant is None:
        base.to(device)
    model = with_lora(base, cfg, adapter_path=adapter_path or cfg.adapter_path or None)
    return Generator(model=model, tokenizer=load_tokenizer(cfg), name=cfg.model)


def with_lora(base: PreTrainedModel, cfg: GeneratorConfig, *, adapter_path: str | None = None) -> PeftModel:
    """Freeze ``base`` and wrap it with LoRA (trainable, fp32 even on a bf16 or 4-bit base: PEFT's
    ``autocast_adapter_dtype``, asked for explicitly as the exchanged weights rely on it). A 4-/8-bit base
    first goes through PEFT's QLoRA preparation (norms and embeddings to fp32), without gradient checkpointing:
    4-bit weights already give the memory saving; recomputing activations would cost a third more time."""
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    base.requires_grad_(False)
    if adapter_path:
        model = PeftModel.from_pretrained(base, adapter_path, is_trainable=True, autocast_adapter_dtype=True)
    else:
        try:
            model = get_peft_model(base, _lora_config(cfg), autocast_adapter_dtype=True)
        except ValueError as e:
            raise ConfigError(f"generator.lora-target-modules = {','.join(cfg.lora_target_modules)!r}: {e}") from e
    model.eval()
    return model


PERSONAL = "personal"  # the PEFT adapter name of a node's own, never-shared adapter


def _lora_config(cfg: GeneratorConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        task_type="CAUSAL_LM",
    )


@torch.no_grad()
def generate(gen: Generator, prompts: list[str], *, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy decoding, batched with left padding; returns only the new text, stripped, in the callers' order."""
    tok = gen.tokenizer
    was_training = gen.model.training
    gen.model.eval()
    # Batches of similar length waste less on padding (-10% s/question on the WQ test set, measured); the
    # answers come back in the callers' order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [prompts[i] for i in order[start : start + batch_size]]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(gen.device)
            out = gen.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :]  # (B, <=max_new_tokens)
            outputs.extend(t.strip() for t in tok.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tok.padding_side = old_side
        gen.model.train(was_training)
    back = sorted(range(len(order)), key=order.__getitem__)  # position of prompt i in the sorted run
    return [outputs[j] for j in back]


def lora_state_dict(gen: Generator, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors as fp32 CPU copies, PEFT keys (adapter name stripped), sorted."""
    state = get_peft_model_state_dict(gen.model, adapter_name=adapter_name)
    return {k: state[k].detach().to("cpu", torch.float32).clone() for k in sorted(state)}


def load_lora_state_dict(
    gen: Generator, state: dict[str, torch.Tensor], *, keep_a: bool = False, adapter_name: str = "default"
) -> None:
    """Set the adapter from ``state``; a missing/unexpected key or a wrong shape is a WeightsError.
    ``keep_a``: ``state`` holds only the B factors (FFA-LoRA), the adapter keeps its own A."""
    current = get_peft_model_state_dict(gen.model, adapter_name=adapter_name)
    missing = sorted(k for k in set(current) - set(state) if not (keep_a and ".lora_A." in k))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise WeightsError(f"LoRA weights do not match the adapter: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise WeightsError(
                f"LoRA weight '{key}' has shape {tuple(value.shape)}, adapter expects {tuple(current[key].shape)}"
            )
    set_peft_model_state_dict(
        gen.model, {k: v.to(current[k].device, current[k].dtype) for k, v in state.items()}, adapter_name=adapter_name
    )


def set_lora_a_trainable(gen: Generator, trainable: bool) -> None:
    """FFA-LoRA freezes every A at its shared start, so averaging the B factors averages the updates B·A exactly."""
    for name, param in gen.model.named_parameters():
        if ".lora_A.default." in name:  # the global adapter's A; a personal adapter's A is the node's own
            param.requires_grad_(trainable)


def lora_a_fingerprint(gen: Generator) -> float:
    """A number that differs when two nodes' A factors differ (FFA-LoRA needs them identical everywhere)."""
    state = get_peft_model_state_dict(gen.model)
    return float(
        sum(torch.sum(state[k].double() * (i + 1)).item() for i, k in enumerate(sorted(state)) if ".lora_A." in k)
    )


def attach_personal_adapter(
    gen: Generator, cfg: GeneratorConfig, state: dict[str, torch.Tensor] | None, *, seed: int
) -> None:
    """Stack a node's own LoRA adapter ("personal") on the global one ("default"); both are active and both train.
    ``state`` restores the node's adapter from earlier rounds; without it a fresh one starts (B = 0: the global
    model unchanged). Only "default" is ever exchanged: lora_state_dict reads that adapter alone."""
    model = gen.model
    if PERSONAL in model.peft_config:
        detach_personal_adapter(gen)
        model.delete_adapter(PERSONAL)
    torch.manual_seed(seed)  # a node's fresh personal A is its own, and reproducible
    model.add_adapter(PERSONAL, _lora_config(cfg), autocast_adapter_dtype=True)
    if state is not None:
        try:
            load_lora_state_dict(gen, state, adapter_name=PERSONAL)
        except WeightsError as e:
            raise WeightsError(
                f"the saved personal adapter does not fit generator.lora-* (delete it to start afresh): {e}"
            ) from e
    model.base_model.set_adapter(["default", PERSONAL])


def detach_personal_adapter(gen: Generator) -> None:
    """Back to the global adapter alone (what the server averages and evaluates)."""
    gen.model.base_model.set_adapter("default")


SCORER = "scorer"  # the PEFT adapter name of a read-only adapter that scores for LSR (lsr.scorer-adapter)


@contextlib.contextmanager
def scoring_adapter(gen: Generator, adapter: str) -> Iterator[Generator]:
    """Inside the block the generator answers with ``adapter`` (a PEFT folder or hub id) alone, then as before.

    The adapter loads beside the one(s) being trained, becomes the only active one, and is deleted on the way out,
    with every parameter's requires_grad and the train/eval mode put back (PEFT's set_adapter changes the flags:
    FFA-LoRA's frozen A must stay frozen). Nothing of it is saved or exchanged. Empty ``adapter``: the generator
    unchanged."""
    if not adapter:
        yield gen
        return
    model = gen.model
    active = list(model.base_model.active_adapters)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training  # PEFT's load_adapter(is_trainable=False) puts the whole model in eval mode
    try:
        model.load_adapter(adapter, adapter_name=SCORER, is_trainable=False, torch_device=str(gen.device))
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"run-config key 'lsr.scorer-adapter' = {adapter!r}: cannot load it onto {gen.name}: {e}"
        ) from e
    try:
        model.base_model.set_adapter(SCORER)
        yield gen
    finally:
        model.base_model.set_adapter(active if len(active) > 1 else active[0])
        model.delete_adapter(SCORER)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
        model.train(was_training)


def save_adapter(gen: Generator, out_dir) -> None:
    """PEFT ``save_pretrained`` (adapter_config.json + adapter_model.safetensors + its model card), written
    atomically. The adapter names its base model as it was given (``gen.name``: a short name, a path or a hub id),
    not by the folder that name resolved to on this machine (PEFT would write that cache path into both files)."""
    base = gen.model.get_base_model()
    named = [(base, "name_or_path"), (base.config, "_name_or_path")]  # the model card's base_model and its tag
    named += [(c, "base_model_name_or_path") for c in gen.model.peft_config.values()]  # adapter_config.json
    resolved = [getattr(obj, attr) for obj, attr in named]
    try:
        for obj, attr in named:
            setattr(obj, attr, gen.name)
        with atomic_dir(out_dir) as tmp:
            gen.model.save_pretrained(tmp)
            gen.tokenizer.save_pretrained(tmp)
    finally:
        for (obj, attr), value in zip(named, resolved):
            setattr(obj, attr, value)
