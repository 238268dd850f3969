"""Flower ServerApp: federated training (fed.task = train) and federated question answering (query). Thin: config,
strategy (strategies.build_strategy), hooks.

After every round: a server-side evaluation (MMLU + Web Questions, sizes from eval.*), a checkpoint written
atomically (PEFT adapter + sentence-transformers retriever + state.json), a metrics JSONL row and a PNG plot.
``fed.resume`` restarts from the last complete checkpoint and keeps numbering rounds from there. What travels
(federation/exchange.py) starts as the models' exchanged weights in fp32 and comes back as the round's aggregate.
Run-config switches: fed.strategy, fed.lora-aggregation and dp.mode pick the strategy (strategies.py); replies
whose weights cannot be averaged are logged and dropped (checked_strategy.py); epsilon from Flower's RDP
accountant goes into every metrics row.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedrag_app.config.app_config import AppConfig, FedConfig
from fedrag_app.config.runtime import apply_runtime
from fedrag_app.config.values import check_federated
from fedrag_app.core import environment
from fedrag_app.core.errors import CheckpointError, ConfigError, StoreError
from fedrag_app.evaluation.evaluate import run_evaluation, write_predictions
from fedrag_app.evaluation.reporting import append_metrics, plot_metrics
from fedrag_app.federation.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_server_state,
    save_checkpoint,
)
from fedrag_app.federation.exchange import exchanged_parts, load_received_state, outgoing_state
from fedrag_app.federation.query import (
    ANSWER_LOG,
    METRICS_LOG,
    REPLY_KINDS,
    answer_and_score,
    load_questions,
    log_row,
    merge,
    read_reply,
    write_outputs,
)
from fedrag_app.flower.records import metric_record, numpy_to_record, record_to_numpy
from fedrag_app.flower.strategies import ServerOptimizer, build_strategy
from fedrag_app.rag.generator import load_generator, lora_a_fingerprint
from fedrag_app.rag.pipeline import open_store
from fedrag_app.rag.retriever import load_retriever

app = ServerApp()


def evaluation_due(cfg: FedConfig, n: int) -> bool:
    """Server-side evaluation after round n: every fed.server-eval-every rounds and after the last one."""
    return cfg.server_eval and (n % cfg.server_eval_every == 0 or n == cfg.num_server_rounds)


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
    device = apply_runtime(cfg.runtime)
    gen, retriever = load_generator(cfg.generator, device=device), load_retriever(cfg.retriever, device=device)
    done = 0
    if cfg.fed.resume and (ckpt := latest_checkpoint(out)) is not None:
        load_checkpoint(ckpt, gen, retriever)
        done = ckpt.round
        log(INFO, "resuming from %s (round %s)", ckpt.path, done)
        if not all(exchanged_parts(cfg.train)):
            log(
                WARNING,
                "train.mode=%s sends only what it trains: nodes keep their configured %s, not the checkpoint's",
                cfg.train.mode,
                "retriever" if cfg.train.mode == "ralt" else "adapter",
            )
    if done >= cfg.fed.num_server_rounds:
        log(INFO, "all %s rounds are done in %s", cfg.fed.num_server_rounds, out)
        return
    initial = numpy_to_record(outgoing_state(cfg, gen, retriever))  # fp32: only nodes' updates use the wire dtype
    strategy = build_strategy(cfg, record_to_numpy(initial), lora_a_fingerprint(gen), rounds_done=done)
    optimizer = strategy.aggregator if isinstance(strategy.aggregator, ServerOptimizer) else None
    if (
        optimizer is not None
        and done
        and not optimizer.restore_optimizer_state(load_server_state(ckpt), record_to_numpy(initial))
    ):
        log(
            WARNING,
            "%s holds no %s state: the server optimizer's momentum / moments restart",
            ckpt.path,
            cfg.fed.strategy,
        )
    try:
        store = open_store(cfg, retriever) if cfg.fed.server_eval and cfg.eval.use_retrieval else None
    except StoreError as e:
        log(WARNING, "server-side evaluation runs closed-book: %s", e)
        store = None

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        load_received_state(cfg, gen, retriever, record_to_numpy(arrays))
        n = done + server_round
        records: list[dict] = []
        metrics = run_evaluation(cfg, gen, retriever, store, records=records) if evaluation_due(cfg.fed, n) else {}
        if records:  # per question, for paired comparisons between runs (fedrag_app/evaluation/paired.py)
            write_predictions(out / "predictions" / f"round-{n}.jsonl", records)
        save_checkpoint(
            out,
            n,
            gen,
            retriever,
            metrics,
            cfg.to_flat(),
            server_state=optimizer.optimizer_state() if optimizer is not None else None,
        )
        row = {
            "round": n,
            **strategy.round_costs,
            **strategy.privacy_metrics(n, cfg.dp),
            **{f"train-{k}": v for k, v in strategy.last_train_metrics.items()},
            **strategy.last_evaluate_metrics,
            **metrics,
        }
        plot_metrics(append_metrics(out / "metrics.jsonl", row), out / "metrics.png")
        log(INFO, "round %s: checkpoint and metrics in %s", n, out)
        return metric_record(metrics)

    offset = ConfigRecord({"round-offset": done})
    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.fed.num_server_rounds - done,
            timeout=cfg.fed.round_timeout_s,
            train_config=offset,
            evaluate_config=offset,
            evaluate_fn=after_round,
        )
    finally:
        if store is not None:
            store.close()


def run_query(grid: Grid, cfg: AppConfig, out: Path) -> None:
    """fed.task = "query": each batch of questions goes to every node as one query.retrieve message (with the query
    vectors of the retriever that answers: a checkpoint's or the base one); the replies that arrive within
    query.timeout-s are checked and merged (federation.query.merge), the generator answers from the merged top
    eval.top-k passages. A node that refuses, errs, sends a bad reply or is late is counted and the others answer.
    Writes answers.jsonl and query-metrics.json to the output folder and logs each answer (for `fedrag-app ask`)."""
    q, started, clock, counts = (
        cfg.query,
        time.perf_counter(),
        {"encode": 0.0, "round-trip": 0.0, "node": 0.0},
        Counter(),
    )
    device = apply_runtime(cfg.runtime)
    gen, retriever = load_generator(cfg.generator, device=device), load_retriever(cfg.retriever, device=device)
    if q.checkpoint:
        ckpt = latest_checkpoint(out) if q.checkpoint == "latest" else Checkpoint(0, Path(q.checkpoint))
        if ckpt is None:
            raise CheckpointError(f"run-config key 'query.checkpoint' = 'latest': no complete checkpoint in {out}")
        load_checkpoint(ckpt, gen, retriever)
    examples, nodes = load_questions(cfg), _nodes_up(grid, cfg.fed.min_nodes, q.timeout_s)
    merged, depth = [], max(cfg.eval.top_k, cfg.eval.recall_k)
    for start in range(0, len(examples), q.batch_size):
        batch, t0 = examples[start : start + q.batch_size], time.perf_counter()
        vectors = retriever.encode_queries([e.question for e in batch]).cpu().numpy()
        t1 = time.perf_counter()
        messages = [
            Message(
                RecordDict(
                    {
                        "query": ConfigRecord(
                            {  # a new record per node: no record object is shared between Messages
                                "questions": [e.question for e in batch],
                                "vectors": vectors.ravel().tolist(),
                                "top-k": q.top_k_per_node,
                                "embedding-model": retriever.name,
                                "context-fingerprint": retriever.context_fingerprint(),
                            }
                        )
                    }
                ),
                dst_node_id=n,
                message_type="query.retrieve",
                group_id=f"q{start}",
            )
            for n in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=q.timeout_s))
        lists, node_seconds = [[] for _ in batch], [0.0]
        for m in replies:
            kind, per_question, seconds, problem = read_reply(m, len(batch), q.top_k_per_node)
            counts[kind] += 1
            if problem:
                log(WARNING, "query.retrieve: node %s: %s: %s", m.metadata.src_node_id, kind, problem)
            node_seconds.append(seconds)
            for hits, got in zip(lists, per_question):
                hits.append(got)
        counts["timeout"] += len(nodes) - len(replies)
        merged += [merge(hits, q.merge, rrf_k=q.rrf_k, top=depth) for hits in lists]
        clock["encode"] += t1 - t0
        clock["round-trip"] += time.perf_counter() - t1
        clock["node"] += max(node_seconds)
    rows, metrics = answer_and_score(cfg, gen, examples, merged, clock)
    metrics.update(
        {
            "nodes": len(nodes),
            **{f"replies-{k}": counts[k] for k in REPLY_KINDS},
            "seconds": time.perf_counter() - started,
        }
    )
    write_outputs(out, rows, metrics)
    for row in rows:
        log(INFO, "%s %s", ANSWER_LOG, json.dumps(log_row(row, cfg.eval.top_k), ensure_ascii=False))
    log(INFO, "%s %s", METRICS_LOG, json.dumps(metrics))


def _nodes_up(grid: Grid, wanted: int, timeout_s: float) -> list[int]:
    """The connected nodes, once fed.min-nodes are up or after query.timeout-s (then whoever is there)."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := sorted(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
    log(INFO, "asking %s node(s)", len(nodes))
    return nodes
