"""Session fixtures: the real packaged models, loaded once; the real data in ../shared/data.

Nothing here is mocked. Tests that change weights must restore them (or use their own instances).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

# Under pytest-xdist (`make test` runs three workers on two cores) each worker and every process it starts keeps to one
# thread: two-thread torch in each of two workers oversubscribes the cores and ran the suite slower than serial.
# Set before torch is imported, so its OpenMP pool starts at that size; Flower and CLI subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

# The longest test files first (their summed durations under `make test`), so that none starts late and ends the run
# alone on one worker while the others idle. The two deployment files are minutes of waiting on Flower processes
# each: started first, on two workers, they overlap the computing files on the others. The Makefile keeps this
# order (--no-loadscope-reorder); the remaining files follow in pytest's order.
LONGEST_FILES_FIRST = (
    "test_deploy.py",
    "test_deploy_faults.py",
    "test_ask_export.py",
    "test_evaluate.py",
    "test_flwr_query.py",
    "test_quickstart.py",
    "test_server_optimizers.py",
    "test_lsr.py",
    "test_flower_app.py",
    "test_privacy.py",
    "test_train_equivalence.py",
    "test_malicious_institution.py",
    "test_experiments.py",
    "test_cli.py",
    "test_embedding_cache.py",
    "test_ingest.py",
    "test_gpu.py",
    "test_heterogeneous_ranks.py",
    "test_local_round.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: pytest's order within a file


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

    from fedrag_app.config.app_config import GeneratorConfig
    from fedrag_app.rag.generator import load_generator

    torch.manual_seed(0)
    return load_generator(GeneratorConfig())


@pytest.fixture(scope="session")
def retriever():
    """all-MiniLM-L6-v2 as a dual encoder. Shared: restore any weights you change."""
    from fedrag_app.config.app_config import RetrieverConfig
    from fedrag_app.rag.retriever import load_retriever

    return load_retriever(RetrieverConfig())


SMALL_CORPUS = 300  # passages in the shared test shard: the first articles of the real corpus


@pytest.fixture(scope="session")
def small_passages(data_dir):
    from fedrag_app.config.app_config import DataConfig
    from fedrag_app.data.loaders import iter_passages

    return list(iter_passages(DataConfig(dir=str(data_dir)), limit=SMALL_CORPUS))


def built_once_per_run(tmp_path_factory, name: str, build) -> Path:
    """`build(path)` once for the whole pytest run, not once per worker: under pytest-xdist the first worker to need
    it builds into the run's shared temp folder (pytest-<N>/, above each worker's own) while the others wait on the
    lock, instead of each repeating the build on the same two cores. `build` must be atomic (a shard build is)."""
    from fedrag_app.core.atomic import build_lock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    target = root / "built-once" / name
    with build_lock(target):
        if not target.exists():
            build(target)
    return target


@pytest.fixture(scope="session")
def small_shard_path(tmp_path_factory, small_passages, request) -> str:
    """A real Qdrant Edge shard of the first 300 Wikipedia passages, encoded once per run; each worker gets its own
    copy (a shard is open in one process at a time): open, use, close it."""
    from fedrag_app.rag.ingest import build_shard

    def build(path: Path) -> None:
        build_shard(small_passages, request.getfixturevalue("retriever"), path=str(path), progress=False)

    path = tmp_path_factory.mktemp("shards") / "wiki300"
    shutil.copytree(built_once_per_run(tmp_path_factory, "wiki300", build), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models_config() -> dict[str, str]:
    """Run-config keys that swap in tiny random-initialised models of the real architectures (tests/tiny_models.py):
    for orchestration tests only (processes, records, checkpoints, faults); maths tests use the real models."""
    from tests.tiny_models import tiny_models

    gen, retr = tiny_models()
    return {"generator.model": gen, "retriever.model": retr}


@pytest.fixture(scope="module")
def tiny_run(tiny_models_config) -> dict:
    """The deployment tests' smallest run (tests/deploy_runs.py) on the tiny models: every process (ServerApp,
    ClientApps) loads them in milliseconds."""
    from tests.deploy_runs import TINY_RUN

    return {**TINY_RUN, **tiny_models_config}


@pytest.fixture(scope="session")
def template_shard(tmp_path_factory, tiny_models_config) -> Path:
    """One small shard built with the app's own CLI and the tiny retriever, once per run (a shard records its
    embedding model, and the nodes check it); never opened itself: each node of a test federation gets a copy (one
    process per shard)."""
    from tests.deploy_runs import build_template_shard

    model = tiny_models_config["retriever.model"]
    return built_once_per_run(tmp_path_factory, "template-shard", lambda path: build_template_shard(path, model))


@pytest.fixture(scope="module")
def node(tmp_path_factory, small_shard_path, data_dir):
    """An institution's files: 6 training questions, 2 held-out ones, and its shard; node-config as on a SuperNode.
    One per test module: the ClientApp's cached models are dropped after each module."""
    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.data.loaders import load_web_questions, write_qa_jsonl
    from fedrag_app.flower import client_app

    folder = tmp_path_factory.mktemp("node")
    questions = load_web_questions("train", AppConfig().data)
    write_qa_jsonl(folder / "train.jsonl", questions[:6])
    write_qa_jsonl(folder / "heldout.jsonl", questions[6:8])
    yield {
        "partition-id": 0,
        "num-partitions": 1,
        "data-path": str(folder / "train.jsonl"),
        "heldout-path": str(folder / "heldout.jsonl"),
        "store-path": small_shard_path,
    }
    client_app._MODELS.clear()


@pytest.fixture
def in_a_server_app(monkeypatch):
    """Messages are built inside a ServerApp process, which knows its run and node: pretend to be one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
