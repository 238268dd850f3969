"""Flower ServerApp: federated training (fed.task = train, flower/server_training.py) and federated question
answering (fed.task = query, flower/server_query.py). This module only reads the run-config, checks it, finds the
output folder and hands over to the task.

Run-config switches: fed.strategy, fed.lora-aggregation and dp.mode pick the strategy (strategies.py); replies
whose weights cannot be averaged are logged and dropped (checked_strategy.py); epsilon from Flower's RDP
accountant goes into every metrics row.
"""

from __future__ import annotations

import time
from logging import WARNING
from pathlib import Path

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedrag_app.config.app_config import AppConfig, FedConfig
from fedrag_app.config.values import check_federated
from fedrag_app.core import environment
from fedrag_app.core.errors import ConfigError
from fedrag_app.flower.server_query import run_query
from fedrag_app.flower.server_training import run_training

app = ServerApp()


def output_dir(cfg: FedConfig) -> Path:
    """fed.output-dir, else $FEDRAG_OUTPUT_DIR, else <cwd>/outputs/fed: absolute (the server's cwd is not the app's)."""
    path = environment.output_dir(cfg.output_dir)
    if cfg.output_dir and not path.is_absolute():
        raise ConfigError(f"run-config key 'fed.output-dir' = {cfg.output_dir!r}: must be an absolute path")
    path.mkdir(parents=True, exist_ok=True)
    return path


def retry_transient_pulls(grid: Grid, attempts: int = 6, sleep=time.sleep) -> None:
    """Retry pulling replies when the SuperLink answers 5xx instead of failing the whole run.

    flwr 1.42's SuperLink answers 500 when its SQLite database stays locked past its 5 s busy_timeout, which
    happens on a loaded machine (seen with three SuperNodes and the SuperLink on 2 cores). The failed
    transaction marked nothing delivered, so pulling again is safe."""
    pull = getattr(grid, "pull_messages", None)
    if pull is None:
        return

    def pull_with_retry(message_ids):
        ids = list(message_ids)
        for attempt in range(1, attempts + 1):
            try:
                return pull(ids)
            except Exception as e:  # httpx.HTTPStatusError, without importing the transport here
                status = getattr(getattr(e, "response", None), "status_code", None)
                if status is None or status < 500 or attempt == attempts:
                    raise
                log(
                    WARNING,
                    "the SuperLink answered %s to pull-messages (attempt %s of %s): retrying",
                    status,
                    attempt,
                    attempts,
                )
                sleep(2**attempt)

    grid.pull_messages = pull_with_retry


@app.main()
def main(grid: Grid, context: Context) -> None:
    retry_transient_pulls(grid)
    cfg = AppConfig.from_flat(context.run_config)
    check_federated(cfg)
    out = output_dir(cfg.fed)
    if cfg.fed.task == "query":
        return run_query(grid, cfg, out)
    return run_training(grid, cfg, out)
