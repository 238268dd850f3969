"""The CLI end to end on the real models: index a real slice of the corpus, then ask; bad input exits 1."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from fedrag_app.cli import app


def test_index_then_ask_answers_from_retrieved_passages(tmp_path, data_dir):
    corpus = tmp_path / "passages.jsonl"
    with open(data_dir / "wikipedia" / "passages.jsonl") as src:
        lines = [line for line in src if '"George Washington"' in line]
    corpus.write_text("".join(lines))
    store = tmp_path / "shard"
    runner = CliRunner()
    result = runner.invoke(app, ["index", str(corpus), "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert f"{len(lines)} passages" in result.output
    again = runner.invoke(app, ["index", str(corpus), "--store", str(store)])
    assert again.exit_code == 0 and f"already indexed {len(lines)} passages" in again.output
    result = runner.invoke(app, ["ask", "who was the first president of the united states", "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert "George Washington" in result.output  # both as a retrieved title and in the answer
    assert "retrieved passages" in result.output


def test_unknown_key_exits_1_with_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedrag_app.cli", "ask", "x", "--set", "eval.topk=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "'eval.topk' is unknown (did you mean 'eval.top-k'?)" in proc.stderr


def test_missing_store_exits_1_and_says_how_to_build_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedrag_app.cli", "ask", "x", "--store", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "fedrag-app index" in proc.stderr


def test_malformed_corpus_line_exits_1_naming_the_line(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(json.dumps({"id": "a", "title": "t", "text": "x"}) + "\n{oops\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedrag_app.cli", "index", str(corpus), "--store", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "bad.jsonl:2: malformed JSON" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_train_writes_adapter_retriever_and_metrics(tmp_path, small_shard_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--mode",
            "ra-dit",
            "--output",
            str(out),
            "--set",
            f"store.path={small_shard_path}",
            "--set",
            "train.num-examples=4",
            "--set",
            "train.max-steps=1",
            "--set",
            "ralt.batch-size=2",
            "--set",
            "lsr.batch-size=2",
            "--set",
            "lsr.top-k=2",
            "--set",
            "fed.num-server-rounds=1",
            "--set",
            "ralt.max-seq-len=192",
            "--set",
            "lsr.max-seq-len=192",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "adapter" / "adapter_config.json").exists() and (
        out / "adapter" / "adapter_model.safetensors"
    ).exists()
    assert (out / "retriever" / "query" / "modules.json").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["ralt-steps"] == 1 and rows[0]["lsr-steps"] == 1
    assert json.loads((out / "config.json").read_text())["train.mode"] == "ra-dit"


def test_evaluate_writes_results_json(tmp_path, small_shard_path):
    out = tmp_path / "results.json"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--output",
            str(out),
            "--predictions",
            str(tmp_path / "predictions.jsonl"),
            "--set",
            f"store.path={small_shard_path}",
            "--set",
            "eval.mmlu-limit=2",
            "--set",
            "eval.web-questions-limit=2",
            "--set",
            "generator.max-new-tokens=6",
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["results"]["mmlu-loglik-n"] == 2 and "retrieval-recall@10" in saved["results"]
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["dataset"] for r in rows] == ["mmlu", "mmlu", "web_questions", "web_questions"]
    assert all({"loglik", "generate", "circular", "cloze"} <= set(r) for r in rows[:2])
    assert all({"answer", "em", "f1", "retrieved", "answer_rank"} <= set(r) for r in rows[2:])
    closed = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--no-retrieval",
            "--set",
            "eval.mmlu-limit=2",
            "--set",
            "eval.web-questions-limit=2",
            "--set",
            "generator.max-new-tokens=6",
        ],
    )
    assert closed.exit_code == 0 and "retrieval-recall" not in closed.output


def test_ask_federation_prints_json_when_asked(monkeypatch):
    """--json with --federation prints one JSON object (not the tables), like ask on a local store."""
    import fedrag_app.federation.ask as federated

    passage = {"id": "p1", "score": 0.03, "node": 7, "partition": 0, "title": "T", "text": "x"}
    reply = {"run-id": 5, "question": "q?", "answer": "Paris", "passages": [passage], "metrics": {"replies-ok": 3}}
    monkeypatch.setattr(federated, "ask_federation", lambda *a, **k: reply)
    result = CliRunner().invoke(app, ["ask", "q?", "--federation", "local", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "question": "q?",
        "answer": "Paris",
        "passages": [{"rank": 1, **passage}],
        "run-id": 5,
        "metrics": {"replies-ok": 3},
    }


def test_export_and_quickstart_take_config_and_set(tmp_path, monkeypatch):
    """Every command takes --config/--set: the keys reach export (over the checkpoint's own) and the quickstart
    (over its embedded defaults); --set wins over the file, a command option over both."""
    import fedrag_app.commands.export as export
    import fedrag_app.commands.quickstart as quickstart

    config = tmp_path / "run.toml"
    config.write_text('[generator]\nmodel = "from-file"\n[fed]\nnum-server-rounds = 9\nserver-lr = 0.5\n')
    seen = {}
    monkeypatch.setattr(
        export, "export_checkpoint", lambda *a, overrides, **k: seen.update(export=overrides) or {"checkpoint": "c"}
    )
    done = CliRunner().invoke(
        app, ["export", "--checkpoint", "c", "--out", "o", "--config", str(config), "--set", "fed.server-lr=1.7"]
    )
    assert done.exit_code == 0, done.output
    assert seen["export"] == {"generator.model": "from-file", "fed.num-server-rounds": 9, "fed.server-lr": 1.7}

    class Fake:
        def __init__(self, overrides, **kwargs):
            seen["quickstart"] = overrides

        def run(self):
            return {}

    monkeypatch.setattr(quickstart, "Quickstart", Fake)
    done = CliRunner().invoke(
        app, ["quickstart", "--config", str(config), "--set", "fed.server-lr=1.7", "--rounds", "2"]
    )
    assert done.exit_code == 0, done.output
    assert seen["quickstart"] == {"generator.model": "from-file", "fed.num-server-rounds": 2, "fed.server-lr": 1.7}


def test_export_refuses_an_unknown_key_by_name(tmp_path):
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "run" / "retriever").mkdir()
    (tmp_path / "run" / "retriever" / "dual_encoder.json").write_text("{}")
    done = CliRunner().invoke(
        app, ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "x"), "--set", "eval.topk=3"]
    )
    assert done.exit_code != 0
    assert "'eval.topk' is unknown" in str(done.exception)


def test_quickstart_without_the_data_stops_at_once_naming_what_to_put_where(tmp_path, monkeypatch):
    (tmp_path / "data" / "wikipedia").mkdir(parents=True)
    (tmp_path / "data" / "wikipedia" / "passages.jsonl").write_text("")
    for folder, lacks in [(tmp_path / "none", "does not exist"), (tmp_path / "data", "lacks web_questions/train")]:
        monkeypatch.setenv("FEDRAG_DATA_DIR", str(folder))
        done = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "out")])
        assert done.exit_code != 0 and not (tmp_path / "out").exists(), "nothing started"
        message = str(done.exception)
        assert f"the data folder {folder} {lacks}" in message
        assert "wikipedia/passages.jsonl" in message and "../shared/data" in message and "docs/DATA.md" in message
