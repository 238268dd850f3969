"""`fedrag-app ask --federation <connection>`: one question through a running federation, with Flower's own CLI.

Submits this app with ``flwr run <app> <connection>`` and ``fed.task = "query"`` (the connection, in
$FLWR_HOME/config.toml, carries the SuperLink address and the app's credentials: TLS CA, account login; ``local``
is Flower's local simulation), waits on the run's log stream until the SuperLink ends it, then reads the status
once with ``flwr ls`` (federation/follow_run.py: no polling while the question is answered), and reads
the answer back from the ServerApp's log (``flwr log``): the ServerApp logs each answer as one JSON line, so this
works whether the SuperLink is on this machine or elsewhere. The run-config goes in a TOML file: a question may hold
any character (``--run-config "k='v'"`` cannot carry both quote kinds).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedrag_app.config.values import toml_lines
from fedrag_app.core.errors import FedRagAppError
from fedrag_app.federation import follow_run as fr
from fedrag_app.federation.query.outputs import ANSWER_LOG, METRICS_LOG

APP_DIR = Path(__file__).resolve().parents[2]  # the checkout holding pyproject.toml: what `flwr run` packages
FLWR = str(Path(sys.executable).with_name("flwr")) if Path(sys.executable).with_name("flwr").exists() else "flwr"


class FederatedRunFailed(FedRagAppError, RuntimeError):
    """The query run was not submitted, did not complete, or logged no answer."""


def query_run_config(question: str, overrides: Mapping[str, Any]) -> str:
    """The TOML text of a one-question query run: the caller's keys, then fed.task and query.question."""
    items = {**overrides, "fed.task": "query", "query.question": question}
    return toml_lines(items)


def answers_from_log(log: str) -> tuple[list[dict], dict]:
    """The answers and the metrics the ServerApp logged (query/outputs.py's ANSWER_LOG / METRICS_LOG lines)."""
    answers, metrics = [], {}
    for line in log.splitlines():
        for marker in (ANSWER_LOG, METRICS_LOG):
            at = line.find(marker + " {")
            if at >= 0:
                obj = json.loads(line[at + len(marker) + 1 :])
                answers.append(obj) if marker == ANSWER_LOG else metrics.update(obj)
    return answers, metrics


def ask_federation(
    question: str,
    connection: str,
    overrides: Mapping[str, Any],
    *,
    app_dir: Path = APP_DIR,
    federation_config: str = "",
    flwr: str = FLWR,
    timeout_s: float = 1800,
    env: dict | None = None,
) -> dict[str, Any]:
    """Run one question across the federation; {"run-id", "question", "answer", "passages", "metrics"}."""
    with tempfile.TemporaryDirectory(prefix="fedrag-ask-") as tmp:
        config = Path(tmp) / "run_config.toml"
        config.write_text(query_run_config(question, overrides))
        try:
            run_id = fr.launch_run(
                str(app_dir), connection, [str(config)], flwr=flwr, env=env, federation_config=federation_config
            )
        except fr.RunFailed as e:
            raise FederatedRunFailed(str(e)) from e
    status = fr.wait_for_run(connection, run_id, timeout_s=timeout_s, flwr=flwr, env=env, follow_log=True)
    done = subprocess.run(
        [flwr, "log", str(run_id), connection, "--show"],
        capture_output=True,
        text=True,
        timeout=120,
        env=fr._cli_env(env),
    )
    answers, metrics = answers_from_log(done.stdout)
    if status != fr.COMPLETED or not answers:
        raise FederatedRunFailed(
            f"run {run_id} on '{connection}' ended '{status}' with {len(answers)} answer(s); "
            f"its log ends:\n{done.stdout[-3000:]}{done.stderr[-1000:]}"
        )
    return {"run-id": run_id, **answers[0], "metrics": metrics}
