"""Process-wide torch state: seeds, thread count, what the device offers, and CUDA memory release.

Plain values in and out, no run-config: config/runtime.py maps the `runtime.*` and `generator.dtype` keys onto these
(and names a key in its errors); the training loop and the ClientApp call them directly."""

from __future__ import annotations

import gc
import os
import random

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def bf16_supported() -> bool:
    """Whether the CUDA device computes in bfloat16 (False without one)."""
    return torch.cuda.is_bf16_supported()


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


def release_memory() -> None:
    """Hand the CUDA caching allocator's free blocks back to the driver. ClientApps that share one GPU in a
    simulation (fractional num-gpus) are separate Ray actors: memory one keeps cached after its round is memory
    the others cannot allocate. A no-op until CUDA is in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()  # activations or optimizer states held by reference cycles
        torch.cuda.empty_cache()
