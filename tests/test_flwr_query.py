"""Federated RAG at question time in Flower's simulation: `fedrag-app partition` into 3 institutions, then a
`flwr run` with fed.task='query' where partitions 0 and 1 opt in and 2 does not; then the same through
`fedrag-app ask --federation local`, and through `fedrag-app mcp --federation local` (the operator's MCP server).
Partition 2's passages never reach the answers; its refusals are counted.

It proves orchestration (which nodes answer, what is refused and counted, what reaches the answers file and the
`ask` output), not answer quality, so it runs on tiny random-initialised models of the real architectures
(tests/tiny_models.py); the shards are built with the tiny retriever. Own FLWR_HOME and ports
(follow_run.local_flwr_env); the local SuperLink and what it started are killed by PID.
"""

from __future__ import annotations

import json
import subprocess
import sys

import anyio
import pytest

from fedrag_app.federation import follow_run
from tests.deploy_helpers import REPO, VENV_BIN

QUESTIONS = 4


def _partition_ids(shard: str, questions: list[str], retriever_model: str) -> set[str]:
    """Every passage id in a (tiny) shard: a search deeper than the shard returns all of it."""
    from fedrag_app.config.app_config import RetrieverConfig
    from fedrag_app.rag.knowledge_store import KnowledgeStore
    from fedrag_app.rag.retriever import load_retriever

    retriever = load_retriever(RetrieverConfig(model=retriever_model))
    with KnowledgeStore.open(path=shard, embedding_model=retriever.name, dim=retriever.dim) as store:
        n = store.count()
        return {h.id for h in store.search(retriever.encode_queries(questions[:1]).numpy()[0], n + 10)}


@pytest.mark.slow
def test_query_run_three_nodes_one_not_opted_in(tmp_path, data_dir, tiny_models_config):
    """Proves, through real processes (CLI, local SuperLink, simulation with 3 SuperNodes, then `fedrag-app ask
    --federation local` on the same SuperLink): the opted-in nodes answer, the third refuses and is counted, none of
    its passages reach the answers, every answer and its passages are written, and no Flower process outlives it."""
    env = follow_run.local_flwr_env(tmp_path / "flwr_home", bin_dir=VENV_BIN)
    retriever_model = tiny_models_config["retriever.model"]
    parts, out = tmp_path / "parts", tmp_path / "outputs"
    done = subprocess.run(
        [
            str(VENV_BIN / "fedrag-app"),
            "partition",
            "-n",
            "3",
            "--out",
            str(parts),
            "--set",
            "partition.questions-per-client=2",
            "--set",
            "partition.passages-per-client=40",
            "--set",
            f"retriever.model={retriever_model}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    common = [
        f"partition.dir='{parts}'",
        "fed.task='query'",
        "fed.min-nodes=3",
        "query.opted-in-partitions='0,1'",
        "query.top-k-per-node=5",  # at least eval.recall-k
        "eval.top-k=2",
        "eval.recall-k=5",
        "generator.max-new-tokens=8",
        "runtime.num-threads=1",
        *(f"{k}='{v}'" for k, v in tiny_models_config.items()),
    ]
    flwr = str(VENV_BIN / "flwr")
    try:
        run_id = follow_run.launch_run(
            str(REPO),
            "local",
            common + [f"fed.output-dir='{out}'", "query.batch-size=2", f"query.questions-limit={QUESTIONS}"],
            flwr=flwr,
            timeout_s=180,
            env=env,
            federation_config="num-supernodes=3",
        )
        status = follow_run.wait_for_run("local", run_id, timeout_s=600, flwr=flwr, env=env, follow_log=True)
        log = subprocess.run(
            [flwr, "log", str(run_id), "local", "--show"], capture_output=True, text=True, timeout=60, env=env
        ).stdout
        assert status == "finished:completed", log[-4000:]
        # the SuperLink ends a finished run's log stream (flwr 1.42): `ask --federation` and the deployment tests wait
        # on it, and would fall back to polling `flwr ls` unnoticed if it broke
        assert follow_run.wait_for_log_end("local", run_id, timeout_s=60, flwr=flwr, env=env)
        rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
        metrics = json.loads((out / "query-metrics.json").read_text())
        assert len(rows) == QUESTIONS and all(r["answer"] and r["gold"] for r in rows)
        assert metrics["replies-ok"] == 2 * 2 and metrics["replies-refused"] == 2, metrics  # 2 batches x 3 nodes
        assert metrics["replies-error"] == metrics["replies-invalid"] == metrics["replies-timeout"] == 0
        assert (
            0 <= metrics["wq-f1"] <= 1 and "retrieval-recall@5" in metrics and metrics["s-per-question-generation"] > 0
        )
        passages = [p for r in rows for p in r["passages"]]
        assert len(passages) == QUESTIONS * 5 and {p["partition"] for p in passages} == {0, 1}
        refused = _partition_ids(str(parts / "client-2" / "shard"), [r["question"] for r in rows], retriever_model)
        assert len(refused) == 40 and not refused & {p["id"] for p in passages}, "partition 2 opted out"
        answered = _partition_ids(str(parts / "client-0" / "shard"), [r["question"] for r in rows], retriever_model)
        assert {p["id"] for p in passages if p["partition"] == 0} <= answered
        assert "fedrag-answer" in log and "refused" in log

        ask = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedrag_app.cli",
                "ask",
                rows[0]["question"],
                "--federation",
                "local",
                "--federation-config",
                "num-supernodes=3",
                "--top-k",
                "2",
            ]
            + [
                a
                for item in common + [f"fed.output-dir='{tmp_path / 'ask'}'"]
                if item.split("=")[0] not in ("eval.top-k",)
                for a in ("--set", item)
            ],
            capture_output=True,
            text=True,
            timeout=900,
            env=dict(env, PYTHONPATH=str(REPO)),
        )
        assert ask.returncode == 0, ask.stdout[-3000:] + ask.stderr[-3000:]
        asked = [json.loads(line) for line in (tmp_path / "ask" / "answers.jsonl").read_text().splitlines()]
        assert [r["question"] for r in asked] == [rows[0]["question"]] and asked[0]["answer"] in ask.stdout
        assert "2 answered, 1 refused" in ask.stdout, ask.stdout
        assert {p["partition"] for p in asked[0]["passages"]} <= {0, 1}

        # the operator's MCP server over the same federation (`fedrag-app mcp --federation`), through the SDK's own
        # stdio client: its `ask` tool is a query run like the one above, so the same answer from the same passages
        from mcp import Client, StdioServerParameters

        mcp_out = tmp_path / "mcp"  # its query run writes answers there, not into the checkout's outputs/
        sets = [
            a
            for item in common + [f"fed.output-dir='{mcp_out}'"]
            if item.split("=")[0] != "eval.top-k"
            for a in ("--set", item)
        ]
        params = StdioServerParameters(
            command=str(VENV_BIN / "fedrag-app"),
            args=["mcp", "--federation", "local", "--federation-config", "num-supernodes=3", *sets],
            env=dict(env, PYTHONPATH=str(REPO)),
        )

        async def mcp_ask() -> dict:
            with anyio.fail_after(900):
                async with Client(params, read_timeout_seconds=900) as client:
                    reply = await client.call_tool("ask", {"question": rows[0]["question"], "k": 2, "max_tokens": 8})
                    assert not reply.is_error, reply.content
                    return reply.structured_content

        served = anyio.run(mcp_ask)
        assert served["answer"] == asked[0]["answer"]
        assert [p["id"] for p in served["sources"]] == [p["id"] for p in asked[0]["passages"][:2]]  # the prompt's 2
        assert json.loads((mcp_out / "answers.jsonl").read_text())["answer"] == served["answer"]
    finally:
        follow_run.stop_local_superlink(env["FLWR_HOME"])
        assert not follow_run.local_federation_pids(env["FLWR_HOME"])
