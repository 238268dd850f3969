"""The experiments runner's bookkeeping: table files are checked by name, and the summary is mean ± std over the
seeds that finished (cells that did not run are counted, not invented)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import typer

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("run_table", REPO / "experiments" / "run_table.py")
run_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_table)


def test_every_shipped_table_loads_and_names_valid_run_config_keys():
    from fedrag_app.config import AppConfig

    tables = sorted((REPO / "experiments" / "tables").glob("*.toml"))
    assert tables
    for path in tables:
        table = run_table.load_table(path)
        for column in table["columns"]:
            for row in table["rows"]:
                AppConfig.from_flat({**table.get("run", {}), **column.get("run", {}), **row.get("run", {}),
                                     **column.get("partition", {})})


def test_a_table_without_rows_is_refused_by_name(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('name = "t"\nseeds = [1]\nmetrics = ["x"]\ncolumns = []\n')
    with pytest.raises(typer.BadParameter, match="'rows'"):
        run_table.load_table(bad)


def test_summary_is_mean_and_sample_std_over_finished_seeds():
    table = {"name": "t", "metrics": ["f1", "eps"], "columns": [{"name": "c"}],
             "rows": [{"name": "a"}, {"name": "b"}, {"name": "never ran"}]}
    results = [{"row": "a", "column": "c", "metrics": {"f1": x, "eps": 8.0}} for x in (0.1, 0.2, 0.3)]
    results.append({"row": "b", "column": "c", "metrics": {"f1": 0.5}})
    text = run_table.summarise(table, results)
    assert "| a | 3 | 0.200 ± 0.100 | 8.000 ± 0.000 |" in text
    assert "| b | 1 | 0.500 | – |" in text and "| never ran | 0 | – | – |" in text
