"""Seeding, device and dtype choice, thread counts, and GPU memory release: process-wide settings."""

from __future__ import annotations

import gc
import os
import random

import numpy as np
import torch

from fedrag_app.config.app_config import RuntimeConfig
from fedrag_app.core.errors import ConfigError


def resolve_device(cfg: RuntimeConfig) -> str:
    """'auto' picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "run-config key 'runtime.device' = 'cuda', but torch sees no CUDA device (in a Flower "
            "simulation a ClientApp sees the GPU only with client-resources-num-gpus > 0)"
        )
    return cfg.device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """generator.dtype: 'auto' = bf16 on a CUDA device that has it (half the memory, tensor-core speed), else fp32
    (bf16 matmuls are slow on most CPUs); asking for bf16 on a GPU without it is an error, not a silent fp32 run."""
    cuda = str(device).startswith("cuda")
    if name == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"run-config key 'generator.dtype' = {name!r}: must be one of {('auto', *DTYPES)}")
    if name == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("run-config key 'generator.dtype' = 'bfloat16', but this GPU has no bfloat16: use 'float32'")
    return DTYPES[name]


def release_memory() -> None:
    """Hand the CUDA caching allocator's free blocks back to the driver. ClientApps that share one GPU in a
    simulation (fractional num-gpus) are separate Ray actors: memory one keeps cached after its round is memory
    the others cannot allocate. A no-op until CUDA is in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()  # activations or optimizer states held by reference cycles
        torch.cuda.empty_cache()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(num_threads: int) -> None:
    """0 = OMP_NUM_THREADS where the environment sets it (torch starts with that many), else one thread per
    available core (oversubscribing 2 cores costs more than it gives)."""
    if not num_threads and os.environ.get("OMP_NUM_THREADS"):
        return
    n = num_threads or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def apply_runtime(cfg: RuntimeConfig) -> str:
    """Seed, set threads, and return the device string."""
    seed_everything(cfg.seed)
    set_threads(cfg.num_threads)
    return resolve_device(cfg)
