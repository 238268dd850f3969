"""The run-config's process-wide settings (`runtime.*`, `generator.dtype`) mapped onto torch: which device and dtype
they ask for, checked against what this machine has, and applied. The torch calls themselves are in
core/torch_runtime.py; this module decides what the keys mean and names a key in each error."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedrag_app.config.app_config import RuntimeConfig
from fedrag_app.core.errors import ConfigError
from fedrag_app.core.torch_runtime import DTYPES, bf16_supported, cuda_available, seed_everything, set_threads

if TYPE_CHECKING:
    import torch


def resolve_device(cfg: RuntimeConfig) -> str:
    """'auto' picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if cfg.device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if cfg.device == "cuda" and not cuda_available():
        raise ConfigError(
            "run-config key 'runtime.device' = 'cuda', but torch sees no CUDA device (in a Flower "
            "simulation a ClientApp sees the GPU only with client-resources-num-gpus > 0)"
        )
    return cfg.device


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """generator.dtype: 'auto' = bf16 on a CUDA device that has it (half the memory, tensor-core speed), else fp32
    (bf16 matmuls are slow on most CPUs); asking for bf16 on a GPU without it is an error, not a silent fp32 run."""
    cuda = str(device).startswith("cuda")
    if name == "auto":
        return DTYPES["bfloat16"] if cuda and bf16_supported() else DTYPES["float32"]
    if name not in DTYPES:
        raise ConfigError(f"run-config key 'generator.dtype' = {name!r}: must be one of {('auto', *DTYPES)}")
    if name == "bfloat16" and cuda and not bf16_supported():
        raise ConfigError("run-config key 'generator.dtype' = 'bfloat16', but this GPU has no bfloat16: use 'float32'")
    return DTYPES[name]


def apply_runtime(cfg: RuntimeConfig) -> str:
    """Seed, set threads, and return the device string."""
    seed_everything(cfg.seed)
    set_threads(cfg.num_threads)
    return resolve_device(cfg)
