"""Flower ServerApp: FedAvg over the LoRA adapter and the retriever's trainable weights. Thin: config, strategy, hooks.

After every round: a server-side evaluation (MMLU + Web Questions, sizes from eval.*), a checkpoint written
atomically (PEFT adapter + sentence-transformers retriever + state.json), a metrics JSONL row and a PNG plot.
``fed.resume`` restarts from the last complete checkpoint and keeps numbering rounds from there.
Replies whose weights cannot be averaged (NaN/Inf, wrong keys or shapes) are logged and dropped.
"""

from __future__ import annotations

import os
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedrag_app.aggregation import check_update, fedavg
from fedrag_app.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fedrag_app.config import AppConfig, FedConfig
from fedrag_app.errors import ConfigError, StoreError
from fedrag_app.evaluate import run_evaluation
from fedrag_app.local_round import exchanged_parts, exchanged_weights, load_exchanged_weights
from fedrag_app.generator import load_generator
from fedrag_app.rag import open_store
from fedrag_app.records import metric_record, numpy_to_record, pack_weights, record_to_numpy, unpack_weights
from fedrag_app.reporting import append_metrics, plot_metrics
from fedrag_app.retriever import load_retriever
from fedrag_app.runtime import apply_runtime

app = ServerApp()


class CheckedFedAvg(FedAvg):
    """FedAvg that refuses updates it cannot average, and keeps the last round's client metrics for reporting."""

    def __init__(self, reference: dict, **kwargs):
        super().__init__(**kwargs)
        self.reference, self.last_train_metrics, self.last_evaluate_metrics = reference, {}, {}
        self.round_costs: dict[str, float] = {}
        self._sent_at, self._sent_bytes = 0.0, 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent_at, self._sent_bytes = time.perf_counter(), arrays.count_bytes() * len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)  # logs counts and errors
        kept, updates = [], []
        for m in ok:
            problem = _reply_problem(m.content, self.weighted_by_key)
            state = record_to_numpy(m.content["arrays"]) if problem is None else {}
            problem = problem or check_update(state, self.reference)
            if problem:
                log(WARNING, "dropped the update of node %s in round %s: %s", m.metadata.src_node_id, server_round, problem)
                continue
            kept.append(m)
            updates.append((state, float(m.content["metrics"][self.weighted_by_key])))
        local = [float(m.content["metrics"].get("local-seconds", 0.0)) for m in kept]
        handler = [float(m.content["metrics"].get("handler-seconds", 0.0)) for m in kept]
        self.round_costs = {  # what Flower adds on top of the clients' own work, and what crossed the network
            "round-train-seconds": time.perf_counter() - self._sent_at, "round-local-seconds-sum": sum(local),
            "round-local-seconds-max": max(local, default=0.0), "round-handler-seconds-sum": sum(handler),
            "round-handler-seconds-max": max(handler, default=0.0), "round-bytes-down": float(self._sent_bytes),
            "round-bytes-up": float(sum(m.content["arrays"].count_bytes() for m in kept))}
        if not kept:
            return None, None
        metrics = self.train_metrics_aggr_fn([m.content for m in kept], self.weighted_by_key)
        self.last_train_metrics = dict(metrics)
        return numpy_to_record(fedavg(updates)), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        self.last_evaluate_metrics = dict(metrics) if metrics else {}
        return metrics


def _reply_problem(content, weight_key: str) -> str | None:
    """Why a reply's records cannot be read (not the numbers in them), or None."""
    if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"}:
        return f"expected one ArrayRecord 'arrays' and one MetricRecord 'metrics', got {sorted(content.keys())}"
    weight = content["metrics"].get(weight_key)
    if not isinstance(weight, (int, float)) or weight <= 0:
        return f"metric '{weight_key}' = {weight!r}: expected a positive number"
    return None


def output_dir(cfg: FedConfig) -> Path:
    """fed.output-dir, else $FEDRAG_OUTPUT_DIR, else <cwd>/outputs/fed: absolute (the server's cwd is not the app's)."""
    path = Path(cfg.output_dir or os.environ.get("FEDRAG_OUTPUT_DIR") or Path.cwd() / "outputs" / "fed")
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
                log(WARNING, "the SuperLink answered %s to pull-messages (attempt %s of %s): retrying", status, attempt,
                    attempts)
                sleep(2**attempt)

    grid.pull_messages = pull_with_retry


@app.main()
def main(grid: Grid, context: Context) -> None:
    retry_transient_pulls(grid)
    cfg = AppConfig.from_flat(context.run_config)
    out = output_dir(cfg.fed)
    device = apply_runtime(cfg.runtime)
    gen, retriever = load_generator(cfg.generator, device=device), load_retriever(cfg.retriever, device=device)
    done = 0
    if cfg.fed.resume and (ckpt := latest_checkpoint(out)) is not None:
        load_checkpoint(ckpt, gen, retriever)
        done = ckpt.round
        log(INFO, "resuming from %s (round %s)", ckpt.path, done)
        if not all(exchanged_parts(cfg.train)):
            log(WARNING, "train.mode=%s sends only what it trains: nodes keep their configured %s, not the checkpoint's",
                cfg.train.mode, "retriever" if cfg.train.mode == "ralt" else "adapter")
    if done >= cfg.fed.num_server_rounds:
        log(INFO, "all %s rounds are done in %s", cfg.fed.num_server_rounds, out)
        return
    initial = pack_weights(*exchanged_weights(cfg.train, gen, retriever), retriever_dtype=cfg.retriever.wire_dtype)
    m = cfg.fed.min_nodes
    strategy = CheckedFedAvg(record_to_numpy(initial), fraction_train=cfg.fed.fraction_train,
                             fraction_evaluate=cfg.fed.fraction_evaluate, min_train_nodes=m, min_evaluate_nodes=m,
                             min_available_nodes=m)
    try:
        store = open_store(cfg, retriever) if cfg.fed.server_eval and cfg.eval.use_retrieval else None
    except StoreError as e:
        log(WARNING, "server-side evaluation runs closed-book: %s", e)
        store = None

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        load_exchanged_weights(gen, retriever, *unpack_weights(arrays, *exchanged_weights(cfg.train, gen, retriever)))
        metrics = run_evaluation(cfg, gen, retriever, store) if cfg.fed.server_eval else {}
        n = done + server_round
        save_checkpoint(out, n, gen, retriever, metrics, cfg.to_flat())
        row = {"round": n, **strategy.round_costs, **{f"train-{k}": v for k, v in strategy.last_train_metrics.items()},
               **strategy.last_evaluate_metrics, **metrics}
        plot_metrics(append_metrics(out / "metrics.jsonl", row), out / "metrics.png")
        log(INFO, "round %s: checkpoint and metrics in %s", n, out)
        return metric_record(metrics)

    offset = ConfigRecord({"round-offset": done})
    try:
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.fed.num_server_rounds - done,
                       timeout=cfg.fed.round_timeout_s, train_config=offset, evaluate_config=offset,
                       evaluate_fn=after_round)
    finally:
        if store is not None:
            store.close()
