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
