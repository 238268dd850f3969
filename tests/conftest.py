"""Session fixtures: the real packaged models, loaded once; the real data in ../shared/data.

Nothing here is mocked. Tests that change weights must restore them (or use their own instances).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FEDRAG_DATA_DIR") or REPO.parent / "shared" / "data").resolve()
os.environ["FEDRAG_DATA_DIR"] = str(DATA_DIR)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA_DIR / "web_questions" / "train.jsonl").exists(), f"test data not found under {DATA_DIR}"
    return DATA_DIR


@pytest.fixture(scope="session")
def generator():
    """SmolLM2-135M-Instruct + a fresh LoRA (seeded). Shared: restore any weights you change."""
    import torch

    from fedrag_app.config import GeneratorConfig
    from fedrag_app.generator import load_generator

    torch.manual_seed(0)
    return load_generator(GeneratorConfig())


@pytest.fixture(scope="session")
def retriever():
    """all-MiniLM-L6-v2 as a dual encoder. Shared: restore any weights you change."""
    from fedrag_app.config import RetrieverConfig
    from fedrag_app.retriever import load_retriever

    return load_retriever(RetrieverConfig())
