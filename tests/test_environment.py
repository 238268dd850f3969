"""core/environment.py: the one reader of FEDRAG_* (run-config key > variable > default; empty = unset)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedrag_app.config.app_config import DataConfig, PartitionConfig
from fedrag_app.core import environment
from fedrag_app.federation.partition import partitions_dir

PACKAGE = Path(__file__).resolve().parents[1] / "fedrag_app"


def test_precedence_config_then_variable_then_default(monkeypatch, tmp_path):
    for name in ("DATA_DIR", "CACHE_DIR", "PARTITIONS_DIR", "OUTPUT_DIR", "VERBOSE"):
        monkeypatch.delenv(getattr(environment, name), raising=False)
    monkeypatch.chdir(tmp_path)
    assert environment.data_dir() == "" and environment.data_dir("/cfg") == "/cfg"
    assert environment.cache_dir() == Path.home() / ".cache" / "fedrag_app"
    assert environment.partitions_dir() == tmp_path.resolve() / "data_partitions"
    assert environment.output_dir() == tmp_path / "outputs" / "fed"
    assert environment.verbose() is False
    for name, value in (("DATA_DIR", "/env-d"), ("CACHE_DIR", "/env-c"), ("PARTITIONS_DIR", "/env-p")):
        monkeypatch.setenv(getattr(environment, name), value)
    monkeypatch.setenv(environment.OUTPUT_DIR, "/env-o")
    monkeypatch.setenv(environment.VERBOSE, "1")
    assert environment.data_dir() == "/env-d" and environment.data_dir("/cfg") == "/cfg"
    assert environment.cache_dir() == Path("/env-c")
    assert partitions_dir(PartitionConfig()) == Path("/env-p")
    assert partitions_dir(PartitionConfig(dir="/c")) == Path("/c")
    assert environment.output_dir() == Path("/env-o") and environment.output_dir("/c") == Path("/c")
    assert environment.verbose() is True
    monkeypatch.setenv(environment.VERBOSE, "false")
    monkeypatch.setenv(environment.CACHE_DIR, "")  # empty = unset
    assert environment.verbose() is False and environment.cache_dir() == Path.home() / ".cache" / "fedrag_app"


def test_loaders_read_data_dir_through_it(monkeypatch, tmp_path):
    from fedrag_app.core.errors import DataError
    from fedrag_app.data.loaders import load_web_questions

    monkeypatch.setenv(environment.DATA_DIR, str(tmp_path / "missing"))
    with pytest.raises(DataError, match="missing"):
        load_web_questions("train", DataConfig())


def test_no_other_module_reads_fedrag_variables():
    reads = re.compile(r"""(environ(\.get)?\s*[\[(]\s*|getenv\(\s*|envvar=\s*)["']FEDRAG_""")
    found = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name != "environment.py" and reads.search(p.read_text())
    )
    assert not found, found
