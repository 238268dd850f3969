"""The ServerApp's training task (fed.task = "train"), one function per step: resume from the last checkpoint, build
the strategy (its server optimizer continuing from the checkpoint), open the server's evaluation store, run the
rounds, and after each round evaluate, checkpoint and record (RoundRecorder).

After every round: a server-side evaluation when due (MMLU + Web Questions, sizes from eval.*), a checkpoint written
atomically (PEFT adapter + sentence-transformers retriever + state.json), a metrics JSONL row and a PNG plot.
``fed.resume`` restarts from the last complete checkpoint and keeps numbering rounds from there. What travels
(federation/exchange.py) starts as the models' exchanged weights in fp32 and comes back as the round's aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from fedrag_app.config.app_config import AppConfig, FedConfig
from fedrag_app.config.runtime import apply_runtime
from fedrag_app.core.errors import StoreError
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
from fedrag_app.flower.checked_strategy import CheckedStrategy
from fedrag_app.flower.records import metric_record, numpy_to_record, record_to_numpy
from fedrag_app.flower.strategies import ServerOptimizer, build_strategy
from fedrag_app.rag.generator import Generator, load_generator, lora_a_fingerprint
from fedrag_app.rag.knowledge_store import KnowledgeStore
from fedrag_app.rag.pipeline import open_store
from fedrag_app.rag.retriever import DualEncoder, load_retriever


def run_training(grid: Grid, cfg: AppConfig, out: Path) -> None:
    """fed.num-server-rounds rounds (less those a resumed run has done) of the configured strategy over the grid."""
    device = apply_runtime(cfg.runtime)
    gen, retriever = load_generator(cfg.generator, device=device), load_retriever(cfg.retriever, device=device)
    ckpt = resume(cfg, out, gen, retriever)
    done = ckpt.round if ckpt is not None else 0
    if done >= cfg.fed.num_server_rounds:
        log(INFO, "all %s rounds are done in %s", cfg.fed.num_server_rounds, out)
        return
    initial = numpy_to_record(outgoing_state(cfg, gen, retriever))  # fp32: only nodes' updates use the wire dtype
    strategy, optimizer = strategy_for(cfg, gen, initial, ckpt)
    store = open_evaluation_store(cfg, retriever)
    recorder = RoundRecorder(cfg, out, gen, retriever, store, strategy, optimizer, done)
    offset = ConfigRecord({"round-offset": done})
    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.fed.num_server_rounds - done,
            timeout=cfg.fed.round_timeout_s,
            train_config=offset,
            evaluate_config=offset,
            evaluate_fn=recorder.after_round,
        )
    finally:
        if store is not None:
            store.close()


def resume(cfg: AppConfig, out: Path, gen: Generator, retriever: DualEncoder) -> Checkpoint | None:
    """Under fed.resume, the last complete checkpoint in ``out``, loaded into the models; None when there is none
    (or fed.resume is off): the run starts at round 0."""
    if not cfg.fed.resume or (ckpt := latest_checkpoint(out)) is None:
        return None
    load_checkpoint(ckpt, gen, retriever)
    log(INFO, "resuming from %s (round %s)", ckpt.path, ckpt.round)
    if not all(exchanged_parts(cfg.train)):
        log(
            WARNING,
            "train.mode=%s sends only what it trains: nodes keep their configured %s, not the checkpoint's",
            cfg.train.mode,
            "retriever" if cfg.train.mode == "ralt" else "adapter",
        )
    return ckpt


def strategy_for(
    cfg: AppConfig, gen: Generator, initial: ArrayRecord, ckpt: Checkpoint | None
) -> tuple[CheckedStrategy, ServerOptimizer | None]:
    """The strategy (strategies.build_strategy) for the initial weights, and its server optimizer if it has one; on a
    resumed run that optimizer continues from the checkpoint's momentum / moments (restarts, logged, without them)."""
    done = ckpt.round if ckpt is not None else 0
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
    return strategy, optimizer


def open_evaluation_store(cfg: AppConfig, retriever: DualEncoder) -> KnowledgeStore | None:
    """The store the server's evaluation retrieves from, when it evaluates with retrieval; None (closed-book, logged)
    when it does not, or when the store cannot be opened."""
    if not (cfg.fed.server_eval and cfg.eval.use_retrieval):
        return None
    try:
        return open_store(cfg, retriever)
    except StoreError as e:
        log(WARNING, "server-side evaluation runs closed-book: %s", e)
        return None


def evaluation_due(cfg: FedConfig, n: int) -> bool:
    """Server-side evaluation after round n: every fed.server-eval-every rounds and after the last one."""
    return cfg.server_eval and (n % cfg.server_eval_every == 0 or n == cfg.num_server_rounds)


@dataclass
class RoundRecorder:
    """What follows each aggregated round (the strategy's evaluate_fn): the global weights loaded into the server's
    models, the server-side evaluation when due, a checkpoint, and a metrics row with the plot redrawn. ``done`` is
    the rounds a resumed run had already completed: round numbers go on from there."""

    cfg: AppConfig
    out: Path
    gen: Generator
    retriever: DualEncoder
    store: KnowledgeStore | None
    strategy: CheckedStrategy
    optimizer: ServerOptimizer | None
    done: int = 0

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # the initial global model: the before, when asked for and not a resumed run
            if not (self.cfg.fed.server_eval and self.cfg.fed.server_eval_round_0) or self.done:
                return None
            metrics = self.evaluate(0)
            self.record(0, metrics)
            return metric_record(metrics)
        load_received_state(self.cfg, self.gen, self.retriever, record_to_numpy(arrays))
        n = self.done + server_round
        metrics = self.evaluate(n)
        self.checkpoint(n, metrics)
        self.record(n, metrics)
        log(INFO, "round %s: checkpoint and metrics in %s", n, self.out)
        return metric_record(metrics)

    def evaluate(self, n: int) -> dict[str, float]:
        """The server-side evaluation when due ({} otherwise); its per-question predictions go to
        predictions/round-N.jsonl, for paired comparisons between runs (fedrag_app/evaluation/paired.py)."""
        if n and not evaluation_due(self.cfg.fed, n):
            return {}
        records: list[dict] = []
        metrics = run_evaluation(self.cfg, self.gen, self.retriever, self.store, records=records)
        if records:
            write_predictions(self.out / "predictions" / f"round-{n}.jsonl", records)
        return metrics

    def checkpoint(self, n: int, metrics: dict[str, float]) -> None:
        save_checkpoint(
            self.out,
            n,
            self.gen,
            self.retriever,
            metrics,
            self.cfg.to_flat(),
            server_state=self.optimizer.optimizer_state() if self.optimizer is not None else None,
        )

    def record(self, n: int, metrics: dict[str, float]) -> None:
        """One metrics.jsonl row (costs, privacy, the nodes' train and evaluate metrics, the server's), plot redrawn."""
        s = self.strategy
        row = {
            "round": n,
            **s.round_costs,
            **s.privacy_metrics(n, self.cfg.dp),
            **{f"train-{k}": v for k, v in s.last_train_metrics.items()},
            **s.last_evaluate_metrics,
            **metrics,
        }
        if n == 0:  # nothing trained or sent yet: the server's evaluation alone
            row = {"round": 0, **metrics}
        plot_metrics(append_metrics(self.out / "metrics.jsonl", row), self.out / "metrics.png")
