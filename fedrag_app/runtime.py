"""Seeding, device choice and thread counts: the process-wide settings every entry point applies first."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from fedrag_app.config import RuntimeConfig
from fedrag_app.errors import ConfigError


def resolve_device(cfg: RuntimeConfig) -> str:
    """'auto' picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run-config key 'runtime.device' = 'cuda', but torch sees no CUDA device")
    return cfg.device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(num_threads: int) -> None:
    """0 = one thread per available core (oversubscribing 2 cores costs more than it gives)."""
    n = num_threads or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def apply_runtime(cfg: RuntimeConfig) -> str:
    """Seed, set threads, and return the device string."""
    seed_everything(cfg.seed)
    set_threads(cfg.num_threads)
    return resolve_device(cfg)
