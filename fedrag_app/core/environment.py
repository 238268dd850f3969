"""The one place that reads the FEDRAG_* environment variables.

Precedence everywhere: the run-config key (passed in as ``configured``), then the variable, then the default.
An empty variable counts as unset.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = "FEDRAG_DATA_DIR"  # the local data folder (docs/DATA.md)
CACHE_DIR = "FEDRAG_CACHE_DIR"  # converted models, default shards, embedding and LM-score caches
PARTITIONS_DIR = "FEDRAG_PARTITIONS_DIR"  # where `fedrag-app partition` writes the institutions' data
OUTPUT_DIR = "FEDRAG_OUTPUT_DIR"  # the ServerApp's checkpoints, metrics and plots
VERBOSE = "FEDRAG_VERBOSE"  # library warnings and progress bars (core/verbosity.py sets it for child processes)
TIMING_LOG = "FEDRAG_TIMING_LOG"  # a ClientApp's per-message phase times (flower/message_clock.py), for benchmarks


def _read(name: str) -> str:
    return os.environ.get(name, "")


def data_dir(configured: str = "") -> str:
    """data.dir, else $FEDRAG_DATA_DIR, else '' (meaning: load from the hub)."""
    return configured or _read(DATA_DIR)


def cache_dir() -> Path:
    """$FEDRAG_CACHE_DIR, else ~/.cache/fedrag_app."""
    return Path(_read(CACHE_DIR) or Path.home() / ".cache" / "fedrag_app")


def partitions_dir(configured: str = "") -> Path:
    """partition.dir, else $FEDRAG_PARTITIONS_DIR, else ./data_partitions; absolute."""
    return Path(configured or _read(PARTITIONS_DIR) or Path.cwd() / "data_partitions").resolve()


def output_dir(configured: str = "") -> Path:
    """fed.output-dir, else $FEDRAG_OUTPUT_DIR, else <cwd>/outputs/fed."""
    return Path(configured or _read(OUTPUT_DIR) or Path.cwd() / "outputs" / "fed")


def verbose() -> bool:
    """$FEDRAG_VERBOSE set to anything but '', '0' or 'false'."""
    return _read(VERBOSE) not in ("", "0", "false")


def timing_log() -> str:
    """$FEDRAG_TIMING_LOG: the JSONL file ClientApps append their per-message phase times to; '' = off."""
    return _read(TIMING_LOG)
