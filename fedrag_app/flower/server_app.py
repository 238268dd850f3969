"""Flower ServerApp: FedAvg over the LoRA adapter and the retriever's trainable weights. Thin: config, strategy, hooks.

After every round: a server-side evaluation (MMLU + Web Questions, sizes from eval.*), a checkpoint written
atomically (PEFT adapter + sentence-transformers retriever + state.json), a metrics JSONL row and a PNG plot.
``fed.resume`` restarts from the last complete checkpoint and keeps numbering rounds from there.
Replies whose weights cannot be averaged (NaN/Inf, wrong keys or shapes) are logged and dropped.
Run-config switches: fed.strategy (FedAvg, or one of Flower's server optimizers: strategies.py),
fed.lora-aggregation (fedavg | ffa | product) and dp.mode (off | client-clip | server-clip |
local: Flower's DP wrappers and mods; epsilon from Flower's RDP accountant goes into every metrics row).
Nodes of a lower LoRA rank (heterogeneous ranks) reply with their own rank; a round with such replies averages the
nodes' ΔW updates (reply minus what each was sent) onto the global ΔW, refactored to the global rank.
With retriever.wire-dtype = float16 nodes send their retriever update in fp16; the server rebuilds fp32 weights.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, RdpAccountant, SamplingMethod, ServerApp
from flwr.serverapp import PrivacyConfig as DpAccounting
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fedrag_app.config.app_config import AppConfig, FedConfig, PrivacyConfig
from fedrag_app.config.runtime import apply_runtime
from fedrag_app.config.values import check_federated
from fedrag_app.core.errors import CheckpointError, ConfigError, StoreError
from fedrag_app.evaluation.evaluate import run_evaluation
from fedrag_app.evaluation.reporting import append_metrics, plot_metrics
from fedrag_app.federation.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_server_state,
    save_checkpoint,
)
from fedrag_app.federation.lora_aggregation import adapter_rank, product_average, rank_update_average, to_global_rank
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
from fedrag_app.federation.update_checks import check_update
from fedrag_app.flower.records import (
    from_wire_update,
    metric_record,
    numpy_to_record,
    pack_weights,
    record_to_numpy,
    unpack_weights,
)
from fedrag_app.flower.strategies import ServerOptimizer, server_strategy
from fedrag_app.rag.generator import load_generator, lora_a_fingerprint
from fedrag_app.rag.pipeline import open_store
from fedrag_app.rag.retriever import load_retriever
from fedrag_app.training.local_round import exchanged_parts, exchanged_weights, load_exchanged_weights

app = ServerApp()


class CheckedStrategy(Strategy):
    """Wraps the aggregation strategy (FedAvg or LoRA product averaging, inside Flower's DP wrapper when DP is on).

    Drops, with a logged reason, the replies whose weights cannot be averaged (unreadable records, NaN/Inf, wrong
    keys or shapes, under FFA-LoRA a different frozen A) before the inner strategy sees them; error replies pass
    through so Flower's own checks log and count them. Keeps the round's costs and client metrics for reporting."""

    def __init__(
        self,
        inner: Strategy,
        fedavg: FedAvg,
        reference: dict,
        *,
        a_fingerprint: float | None = None,
        global_rank: int | None = None,
        lora_alpha: float = 16.0,
        rank_method: str = "truncate",
        wire_updates: bool = False,
    ):
        super().__init__()
        self.inner, self.fedavg, self.reference, self.a_fingerprint = inner, fedavg, reference, a_fingerprint
        self.global_rank = global_rank  # set: replies may have a lower LoRA rank (heterogeneous ranks)
        self.lora_alpha, self.rank_method = lora_alpha, rank_method  # how nodes cut the global adapter to their rank
        self.wire_updates = wire_updates  # replies carry the retriever's update in the wire dtype, not its weights
        self.sent_global = reference  # the global arrays of the round in progress (configure_train updates it)
        self.last_train_metrics, self.last_evaluate_metrics = {}, {}
        self.round_costs: dict[str, float] = {}
        self._sent_at, self._sent_bytes = 0.0, 0

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.global_rank is not None or self.wire_updates:
            self.sent_global = record_to_numpy(arrays)  # what the replies are updates of
        self._sent_at, self._sent_bytes = time.perf_counter(), arrays.count_bytes() * len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        passed, bytes_up, replies = [], 0.0, list(replies)
        for m in replies:
            size = 0 if m.has_error() else m.content["arrays"].count_bytes() if "arrays" in m.content else 0
            problem = None if m.has_error() else self._problem(m.content)
            bytes_up += 0 if problem else size
            if problem:
                log(
                    WARNING,
                    "dropped the update of node %s in round %s: %s",
                    m.metadata.src_node_id,
                    server_round,
                    problem,
                )
            else:
                passed.append(m)
        kept = [m for m in passed if not m.has_error()]
        rank_losses = self._merge_rank_updates(kept) if self.global_rank is not None else {}
        local = [float(m.content["metrics"].get("local-seconds", 0.0)) for m in kept]
        handler = [float(m.content["metrics"].get("handler-seconds", 0.0)) for m in kept]
        self.round_costs = {  # what Flower adds on top of the clients' own work, and what crossed the network
            "round-train-seconds": time.perf_counter() - self._sent_at,
            "round-local-seconds-sum": sum(local),
            "round-local-seconds-max": max(local, default=0.0),
            "round-handler-seconds-sum": sum(handler),
            "round-handler-seconds-max": max(handler, default=0.0),
            "round-bytes-down": float(self._sent_bytes),
            "round-bytes-up": bytes_up,
            "round-updates-averaged": float(len(kept)),
            "round-failures": float(len(replies) - len(kept)),
        }  # error replies and dropped updates
        if self.inner is not self.fedavg:  # Flower's DP noise draws from numpy's global RNG, seeded by runtime.seed
            np.random.seed()  # fresh OS entropy: noise that anyone knowing the seed could subtract protects nothing
        arrays, metrics = self.inner.aggregate_train(server_round, passed)
        self.last_train_metrics = dict(metrics) if metrics else {}
        if arrays is not None and (extra := getattr(self.fedavg, "last_aggregation_metrics", None)):
            self.round_costs.update(extra)
        if arrays is not None:
            self.round_costs.update(rank_losses)
        return arrays, metrics

    def _merge_rank_updates(self, kept: list[Message]) -> dict[str, float]:
        """A round with a lower-rank reply: the LoRA aggregate is ΔW_global + Σ w_i (ΔW(reply_i) − ΔW(sent_i))
        (lora_aggregation.rank_update_average); every reply's LoRA factors are replaced by it, so the inner strategy
        averages identical factors and handles the other keys and the metrics as usual."""
        states = [record_to_numpy(m.content["arrays"]) for m in kept]
        if not any(adapter_rank(s) < self.global_rank for s in states if any(".lora_A." in k for k in s)):
            return {}
        weights = [float(m.content["metrics"][self.fedavg.weighted_by_key]) for m in kept]
        merged, lost = rank_update_average(
            self.sent_global, states, weights, alpha=self.lora_alpha, method=self.rank_method
        )
        for m, state in zip(kept, states):
            m.content["arrays"] = numpy_to_record({k: merged.get(k, v) for k, v in state.items()})
        return {f"lora-{k}": v for k, v in lost.items()}

    def _problem(self, content) -> str | None:
        problem = _reply_problem(content, self.fedavg.weighted_by_key)
        if problem is None and self.wire_updates:
            problem = _rebuild_wire_update(content, self.sent_global)
        if problem is None and self.global_rank is not None:
            problem = _padded_problem(content, self.global_rank, self.reference)
        elif problem is None:
            problem = check_update(record_to_numpy(content["arrays"]), self.reference)
        if problem is None and self.a_fingerprint is not None:
            theirs = content["metrics"].get("lora-a-fingerprint")
            if theirs is None or abs(float(theirs) - self.a_fingerprint) > 1e-6 * max(1.0, abs(self.a_fingerprint)):
                problem = (
                    f"its frozen LoRA A (fingerprint {theirs}) is not the server's ({self.a_fingerprint}): "
                    "FFA-LoRA needs the same generator, LoRA config and runtime.seed on every node"
                )
        return problem

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        self.last_evaluate_metrics = dict(metrics) if metrics else {}
        return metrics

    def privacy_metrics(self, rounds_done: int, cfg: PrivacyConfig) -> dict[str, float]:
        """epsilon spent so far: Flower's RDP accountant in the central modes; per-round epsilon x rounds (basic
        composition) in local mode; nothing when DP is off."""
        spent = self.inner.privacy_spent() if hasattr(self.inner, "privacy_spent") else None
        if spent is not None:
            return {
                "dp-epsilon": float(spent.epsilon),
                "dp-delta": float(spent.delta),
                "dp-releases": spent.num_releases,
            }
        if cfg.mode == "local":
            return {"dp-epsilon": cfg.local_epsilon * rounds_done, "dp-delta": cfg.delta * rounds_done}
        return {}


class LoraProductFedAvg(FedAvg):
    """FedAvg whose LoRA factors are aggregated as the weighted mean of B·A per layer, refactored to rank r by
    truncated SVD (lora_aggregation.product_average); the retriever is averaged as in FedAvg."""

    def __init__(self, *, rank: int, alpha: float, **kwargs):
        super().__init__(**kwargs)
        self.rank, self.alpha, self.last_aggregation_metrics = rank, alpha, {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        states = [record_to_numpy(c["arrays"]) for c in contents]
        weights = [float(c["metrics"][self.weighted_by_key]) for c in contents]
        state, lost = product_average(states, weights, rank=self.rank, alpha=self.alpha)
        self.last_aggregation_metrics = {f"lora-{k}": v for k, v in lost.items()}
        dtypes = {k: v.dtype for k, v in states[0].items()}
        merged = numpy_to_record({k: state[k].astype(dtypes[k]) for k in states[0]})  # the replies' key order
        return merged, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def build_strategy(
    cfg: AppConfig, reference: dict, a_fingerprint: float | None, *, rounds_done: int = 0
) -> CheckedStrategy:
    """FedAvg (or LoRA product averaging), wrapped in Flower's DP strategy when dp.mode is central, then checked.

    Under central DP every node weighs the same ('dp-weight' = 1: the noise is calibrated to C / nodes) and each
    round samples exactly fed.min-nodes nodes (the fixed sample size Flower's accountant requires). A resumed run
    charges the accountant for every round already done (the same release each round; at worst an over-count)."""
    m, central = cfg.fed.min_nodes, cfg.dp.central
    kwargs = dict(
        fraction_train=1e-9 if central else cfg.fed.fraction_train,  # max(int(n * 1e-9), m) = m nodes
        fraction_evaluate=cfg.fed.fraction_evaluate,
        min_train_nodes=m,
        min_evaluate_nodes=m,
        min_available_nodes=m,
        weighted_by_key="dp-weight" if central else "num-examples",
    )
    if cfg.fed.lora_aggregation == "product":
        fedavg: FedAvg = LoraProductFedAvg(rank=cfg.generator.lora_r, alpha=cfg.generator.lora_alpha, **kwargs)
    else:  # FedAvg, or the server optimizer fed.strategy names (config_checks refuses it with product / central DP)
        fedavg = server_strategy(cfg.fed, round_offset=rounds_done, **kwargs)
    inner: Strategy = fedavg
    if central:
        accountant = None
        if cfg.dp.noise_multiplier > 0:
            accountant = RdpAccountant(
                DpAccounting(
                    target_delta=cfg.dp.delta,
                    population_size=m,
                    neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=SamplingMethod.NO_AMPLIFICATION,
                )
            )
            if rounds_done:
                accountant.compose(GaussianPrivacyEvent(cfg.dp.noise_multiplier, m, m), count=rounds_done)
        wrapper = (
            DifferentialPrivacyClientSideFixedClipping
            if cfg.dp.mode == "client-clip"
            else DifferentialPrivacyServerSideFixedClipping
        )
        inner = wrapper(fedavg, cfg.dp.noise_multiplier, cfg.dp.clipping_norm, m, accountant=accountant)
    pads = cfg.fed.lora_aggregation != "ffa" and cfg.dp.mode == "off" and exchanged_parts(cfg.train)[0]
    return CheckedStrategy(
        inner,
        fedavg,
        reference,
        a_fingerprint=a_fingerprint if cfg.fed.lora_aggregation == "ffa" else None,
        global_rank=cfg.generator.lora_r if pads else None,
        lora_alpha=cfg.generator.lora_alpha,
        rank_method="svd" if cfg.fed.lora_aggregation == "product" else "truncate",
        wire_updates=cfg.retriever.wire_dtype != "float32" and exchanged_parts(cfg.train)[1],
    )


def evaluation_due(cfg: FedConfig, n: int) -> bool:
    """Server-side evaluation after round n: every fed.server-eval-every rounds and after the last one."""
    return cfg.server_eval and (n % cfg.server_eval_every == 0 or n == cfg.num_server_rounds)


def _padded_problem(content, rank: int, reference: dict) -> str | None:
    """Why a reply of rank <= ``rank`` cannot be used (checked as its rank-``rank`` padding, same ΔW), or None."""
    try:
        return check_update(to_global_rank(record_to_numpy(content["arrays"]), rank=rank), reference)
    except (ValueError, AssertionError) as e:
        return str(e)


def _rebuild_wire_update(content, sent: dict) -> str | None:
    """Replace a reply's wire-dtype retriever update by fp32 weights (what was sent + the update); why not, or None."""
    try:
        content["arrays"] = from_wire_update(content["arrays"], sent)
    except (KeyError, ValueError) as e:
        return f"its retriever update cannot be rebuilt: {e}"
    return None


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
    initial = pack_weights(*exchanged_weights(cfg, gen, retriever))  # fp32: only the nodes' updates use the wire dtype
    strategy = build_strategy(cfg, record_to_numpy(initial), lora_a_fingerprint(gen), rounds_done=done)
    optimizer = strategy.fedavg if isinstance(strategy.fedavg, ServerOptimizer) else None
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
        load_exchanged_weights(cfg, gen, retriever, *unpack_weights(arrays, *exchanged_weights(cfg, gen, retriever)))
        n = done + server_round
        metrics = run_evaluation(cfg, gen, retriever, store) if evaluation_due(cfg.fed, n) else {}
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
    query.timeout-s are checked and merged (federated_query.merge), the generator answers from the merged top
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
                            {  # a new record per node (FLOWER.md section 2)
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
