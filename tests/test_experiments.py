"""The experiments runner's bookkeeping: table files are checked by name, and the summary is mean ± std over the
seeds that finished (cells that did not run are counted, not invented), and a runner stopped mid-cell takes every
process it started with it."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("run_table", REPO / "experiments" / "run_table.py")
run_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_table)


def test_every_shipped_table_loads_and_names_valid_run_config_keys():
    from fedrag_app.config.app_config import AppConfig

    tables = sorted((REPO / "experiments" / "tables").glob("*.toml"))
    assert tables
    for path in tables:
        table = run_table.load_table(path)
        for column in table["columns"]:
            for row in table["rows"]:
                AppConfig.from_flat(
                    {
                        **table.get("run", {}),
                        **column.get("run", {}),
                        **row.get("run", {}),
                        **column.get("partition", {}),
                    }
                )


def test_a_table_without_rows_is_refused_by_name(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('name = "t"\nseeds = [1]\nmetrics = ["x"]\ncolumns = []\n')
    with pytest.raises(typer.BadParameter, match="'rows'"):
        run_table.load_table(bad)


@pytest.mark.parametrize(
    ("share", "refusal"),
    [
        ('{ metric = "wq-f1", row = "R", column = "c" }', "gain-share names row 'R'"),
        ('{ metric = "wq-f1", row = "r" }', "exactly metric, row and column"),
        ('{ metric = "wq-f1", row = "u", column = "c" }', "a baseline row other than that row"),
        ('{ metric = "wq-f2", row = "r", column = "c" }', "metric 'wq-f2' is not among the paired metrics"),
    ],
)
def test_a_gain_share_that_names_no_sound_reference_is_refused_by_name(tmp_path, share, refusal):
    bad = tmp_path / "t.toml"
    bad.write_text(
        'name = "t"\nseeds = [1]\nmetrics = ["wq-f1"]\nbaseline = "u"\n'
        f"gain-share = {share}\n"
        '[[rows]]\nname = "u"\n[[rows]]\nname = "r"\n[[columns]]\nname = "c"\n'
    )
    with pytest.raises(typer.BadParameter, match=refusal):
        run_table.load_table(bad)
    bad.write_text(bad.read_text().replace(share, '{ metric = "wq-f1", row = "r", column = "c" }'))
    assert run_table.load_table(bad)["gain-share"]["row"] == "r", "the sound one loads"


def test_summary_is_mean_and_sample_std_over_finished_seeds():
    table = {
        "name": "t",
        "metrics": ["f1", "eps"],
        "columns": [{"name": "c"}, {"name": "d"}],
        "rows": [{"name": "a"}, {"name": "b"}, {"name": "never ran"}, {"name": "only d", "columns": ["d"]}],
    }
    results = [{"row": "a", "column": "c", "metrics": {"f1": x, "eps": 8.0}} for x in (0.1, 0.2, 0.3)]
    results.append({"row": "b", "column": "c", "metrics": {"f1": 0.5}})
    text = run_table.summarise(table, results)
    assert "| a | 3 | 0.200 ± 0.100 | 8.000 ± 0.000 |" in text
    assert "| b | 1 | 0.500 | – |" in text and "| never ran | 0 | – | – |" in text
    c_section, d_section = text.split("## d")
    assert "only d" not in c_section and "| only d | 0 | – | – |" in d_section, "a row shows only where it runs"


def test_cells_run_seed_major_and_row_and_column_filters_keep_only_the_named_ones():
    table = run_table.load_table(REPO / "experiments" / "tables" / "quality_full.toml")
    every = [(c["name"], r["name"], s) for c, r, s in run_table.ordered_cells(table)]
    assert every[:3] == [
        ("centralized", "LM, no retrieval", 1),
        ("centralized", "RAG, no fine-tuning", 1),
        ("centralized", "RALT", 1),
    ]
    assert ("centralized", "RALT", 2) not in every[: every.index(("centralized", "RA-DIT", 1))]
    assert not [cell for cell in every if cell[1] == "RA-DIT" and cell[2] != 1]  # the row's own seeds
    runs = {(c if r not in ("LM, no retrieval", "RAG, no fine-tuning") else "evaluate", r, s) for c, r, s in every}
    assert len(runs) == 29  # the evaluation rows are listed in every column but run once
    ralt = [(c["name"], r["name"], s) for c, r, s in run_table.ordered_cells(table, only_rows=["RALT"])]
    assert ralt == [cell for cell in every if cell[1] == "RALT"] and len(ralt) == 9
    with pytest.raises(typer.BadParameter, match="'RALTT'"):
        run_table.ordered_cells(table, only_rows=["RALTT"])
    central = run_table.ordered_cells(table, only_rows=["RALT"], only_columns=["centralized"])
    assert [(c["name"], s) for c, r, s in central] == [("centralized", 1), ("centralized", 2), ("centralized", 3)]
    with pytest.raises(typer.BadParameter, match="no column named 'central'"):
        run_table.ordered_cells(table, only_columns=["central"])


TINY_TABLE = """
name = "interrupted"
seeds = [1]
metrics = ["ralt-loss-mean"]
[run]
"train.mode" = "ralt"
"train.num-examples" = 4
"train.max-steps" = 1
"ralt.batch-size" = 2
"ralt.top-k" = 1
"ralt.max-seq-len" = 128
"fed.num-server-rounds" = 500
"generator.model" = "{generator}"
"retriever.model" = "{retriever}"
"fed.server-eval" = false
"runtime.num-threads" = 1
[[columns]]
name = "centralized"
num-partitions = 1
scheme = "iid"
[columns.partition]
"partition.questions-per-client" = 6
"partition.passages-per-client" = 60
"retriever.model" = "{retriever}"
[[rows]]
name = "RALT"
"""


@pytest.mark.slow
def test_sigterm_stops_the_table_and_every_process_it_started(tmp_path, data_dir, tiny_models_config):
    """`kill` on the runner mid-cell must not orphan the local SuperLink, flwr-simulation or its Ray workers (they
    would keep the cores busy and race the next run), and must leave no result for the cell it cut short.

    Processes, not maths: the cell trains tiny random-initialised models of the real architectures
    (tests/tiny_models.py) for 500 rounds, so it is still running when the signal comes; the runner picks its own
    free ports (follow_run.local_flwr_env)."""
    gen, retr = tiny_models_config["generator.model"], tiny_models_config["retriever.model"]
    (tmp_path / "t.toml").write_text(TINY_TABLE.format(generator=gen, retriever=retr))
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    runner = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "experiments" / "run_table.py"),
            str(tmp_path / "t.toml"),
            "--results-dir",
            str(tmp_path / "results"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    root = tmp_path / "results" / "interrupted"
    flwr_home = str(root / "flwr_home")

    try:
        deadline = time.monotonic() + 600
        while not run_table.follow_run.local_federation_pids(flwr_home, b"flwr-simulation"):
            assert runner.poll() is None, runner.stdout.read()
            assert time.monotonic() < deadline, "the cell's simulation never started"
            time.sleep(1)
        time.sleep(5)  # let Ray start its workers: they must go too
        runner.send_signal(signal.SIGTERM)
        out, _ = runner.communicate(timeout=120)
        assert runner.returncode == 130, out
        assert "interrupted" in out, out
        assert not run_table.follow_run.local_federation_pids(flwr_home)
        assert not list((root / "cells").rglob("*.json"))
    finally:
        if runner.poll() is None:
            runner.kill()
        run_table.follow_run.stop_local_superlink(flwr_home)


def test_keep_adapter_copies_the_last_rounds_adapter_of_a_ralt_cell_only(tmp_path):
    import json as _json

    for n, mode in ((1, "ralt"), (2, "ralt")):
        (tmp_path / "cell" / f"round-{n:04d}" / "adapter").mkdir(parents=True)
        (tmp_path / "cell" / f"round-{n:04d}" / "adapter" / "adapter_model.safetensors").write_text(f"round {n}")
        (tmp_path / "cell" / f"round-{n:04d}" / "adapter" / "tokenizer.json").write_text("{}")
        (tmp_path / "cell" / f"round-{n:04d}" / "state.json").write_text(
            _json.dumps({"round": n, "config": {"train.mode": mode}})
        )
    kept = run_table.keep_adapter(tmp_path / "cell", tmp_path / "adapters" / "col" / "ralt" / "seed-1")
    assert (kept / "adapter_model.safetensors").read_text() == "round 2"
    assert _json.loads((kept / "round.json").read_text())["round"] == 2
    assert not (kept / "tokenizer.json").exists(), "the base model's tokenizer is not copied into every cell"
    (tmp_path / "lsr" / "round-0001" / "adapter").mkdir(parents=True)
    (tmp_path / "lsr" / "round-0001" / "state.json").write_text(
        _json.dumps({"round": 1, "config": {"train.mode": "lsr"}})
    )
    assert run_table.keep_adapter(tmp_path / "lsr", tmp_path / "adapters" / "lsr") is None


def test_results_keep_no_machine_paths():
    """A run-config path inside the checkout is recorded relative to it; anything else is kept as given."""
    inside = str(REPO / "results" / "t" / "partitions" / "c")
    assert run_table.repo_relative(inside) == "results/t/partitions/c"
    assert run_table.repo_relative("/elsewhere/x") == "/elsewhere/x" and run_table.repo_relative(3) == 3


def test_placeholders_fill_in_the_checkout_and_the_cells_seed_and_are_recorded_relative():
    value = run_table.expand("{repo}/results/quality_full/adapters/centralized/ralt/seed-{seed}", 2)
    assert value == f"{REPO}/results/quality_full/adapters/centralized/ralt/seed-2"
    assert run_table.repo_relative(value) == "results/quality_full/adapters/centralized/ralt/seed-2"
    assert run_table.expand("plain", 2) == "plain" and run_table.expand(0.5, 2) == 0.5


def test_keep_retriever_saves_the_last_rounds_update_and_restores_the_retriever_from_it(tmp_path, tiny_models_config):
    """A retriever cell's final trainable weights are kept as their fp16 update against the base and rebuilt from it
    to within fp16's rounding of the update; a RALT cell keeps none; a base that moved is refused."""
    import json as _json

    import torch
    from safetensors.numpy import load_file

    from fedrag_app.config.app_config import RetrieverConfig
    from fedrag_app.core.errors import WeightsError
    from fedrag_app.rag.retriever import load_retriever

    config = {"retriever.model": tiny_models_config["retriever.model"], "retriever.train-top-layers": 1}
    base = load_retriever(RetrieverConfig(model=config["retriever.model"], train_top_layers=1)).trainable_state_dict()
    for n in (1, 2):
        retriever = load_retriever(RetrieverConfig(model=config["retriever.model"], train_top_layers=1))
        with torch.no_grad():
            for p in retriever.trainable_parameters():
                p.add_(0.001 * n)  # each round's weights told apart, by an update the size of LSR's
        retriever.save(tmp_path / "cell" / f"round-{n:04d}" / "retriever")
        (tmp_path / "cell" / f"round-{n:04d}" / "state.json").write_text(
            _json.dumps({"round": n, "config": {**config, "train.mode": "ra-dit"}})
        )
    kept = run_table.keep_retriever(tmp_path / "cell", tmp_path / "retrievers" / "col" / "lsr" / "seed-1")
    update = load_file(str(kept / "update.safetensors"))
    assert set(update) == {f"retriever.{k}" for k in base}, "the trainable weights, by their exchange keys"
    assert all(u.dtype.name == "float16" for u in update.values())
    meta = _json.loads((kept / "round.json").read_text())
    assert meta["round"] == 2 and meta["max-abs-update"] == pytest.approx(0.002, rel=1e-3)
    assert meta["max-abs-rounding-error"] < 0.002 * 2**-10, "fp16 keeps ~3 digits of the update"
    restored = run_table.restore_retriever(kept).trainable_state_dict()
    for key, value in restored.items():
        torch.testing.assert_close(value, base[key] + 0.002, atol=0.002 * 2**-10 + 1e-7, rtol=0)
    meta["base-fingerprint"] = "0" * 64
    (kept / "round.json").write_text(_json.dumps(meta))
    with pytest.raises(WeightsError, match="round.json"):
        run_table.restore_retriever(kept)
    (tmp_path / "ralt" / "round-0001").mkdir(parents=True)
    (tmp_path / "ralt" / "round-0001" / "state.json").write_text(
        _json.dumps({"round": 1, "config": {"train.mode": "ralt"}})
    )
    assert run_table.keep_retriever(tmp_path / "ralt", tmp_path / "retrievers" / "ralt") is None
