"""Flower ClientApp: an institution's node. Thin: unpack, call the library, pack.

train    -> run_local_round (RALT / LSR / RA-DIT) on its own questions against its own Qdrant shard;
            replies with one ArrayRecord ("lora.*" and/or "retriever.*": what travels, federation/exchange.py),
            one MetricRecord of scalars and, under FFA-LoRA, a ConfigRecord "checks" holding the fingerprint of
            its frozen A. With train.keep-optimizer-state the node's AdamW state persists across
            rounds in its Flower context.state (records.save_optimizer_state), never in a reply.
evaluate -> Web Questions EM/F1 and retrieval recall@k/MRR on its held-out questions (scalars only).
Under any dp.mode but off, disclosure_mod keeps in a reply only the weights the DP mechanism covers and public
            values; what the node computed on its data leaves only if its node-config sets dp-share-metrics = true.
query.retrieve -> top-k passages per question from its shard, only if its node-config sets federated-retrieval=true
            (in simulation: its partition id is in run-config query.opted-in-partitions).

Every handler resolves the node's setup (configs, LoRA rank, data and shard) once per message: node_setup.
Models are loaded once per process (simulation reuses Ray actors across nodes and rounds; every message
overwrites the weights with the global ones). Shards are opened per message and closed at its end, so no
two nodes in one process ever hold the same lock.

In deployment flwr 1.42 runs every message in a fresh `flwr-clientapp` process (docs/PERFORMANCE.md, Deployment), so
this module imports only what every message needs (flwr, numpy, the configs, the shard): torch, transformers, peft
and sentence-transformers are imported by the train and evaluate handlers, which load the models; a query message
with the server's query vectors (what the ServerApp always sends) never imports them.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import log
from flwr.common.constant import ErrorCode

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.errors import ConfigError
from fedrag_app.federation.disclosure import SHARE_KEY, UNPROTECTED, split_private
from fedrag_app.federation.node_data import node_data, node_mmlu, node_questions
from fedrag_app.federation.node_setup import NodeSetup, node_setup
from fedrag_app.federation.query import REFUSAL, opted_in, over_limits, pack_hits
from fedrag_app.flower.local_dp import AnalyticLocalDpMod
from fedrag_app.flower.message_clock import MessageClock, stamp
from fedrag_app.flower.records import (
    A_FINGERPRINT,
    CHECKS,
    load_optimizer_state,
    metric_record,
    numpy_to_record,
    record_to_numpy,
    save_optimizer_state,
    to_wire_update,
)
from fedrag_app.rag.knowledge_store import KnowledgeStore

if TYPE_CHECKING:
    from fedrag_app.federation.personal import RoundOf
    from fedrag_app.rag.generator import Generator
    from fedrag_app.rag.retriever import DualEncoder

app = ClientApp()
QUERY_ANSWERED = "query-answered"  # context.state ConfigRecord: questions this node answered in this run
_MODELS: dict = {}  # (generator config, retriever config, runtime) -> (Generator, DualEncoder), one per process


def _models(cfg: AppConfig) -> tuple[Generator, DualEncoder]:
    from fedrag_app.config.runtime import apply_runtime
    from fedrag_app.core.torch_runtime import release_memory
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.retriever import load_retriever

    key = (cfg.generator, cfg.retriever, cfg.runtime)
    if key not in _MODELS:
        _MODELS.clear()  # another run's models: free them first
        release_memory()
        device = apply_runtime(cfg.runtime)
        _MODELS[key] = (load_generator(cfg.generator, device=device), load_retriever(cfg.retriever, device=device))
    return _MODELS[key]


def privacy_mod(msg: Message, context: Context, call_next) -> Message:
    """dp.mode picks the client-side DP mod for this run: Flower's fixedclipping_mod (client-clip: the node clips its
    update to the clipping norm the server's DP wrapper sends) or AnalyticLocalDpMod (local: it clips and adds its
    own noise, calibrated by the analytic Gaussian mechanism). Local DP covers the node's weights against its whole
    dataset swapped: that moves its clipped update by up to 2C (two updates of norm <= C), so the noise is calibrated
    to sensitivity 2C, not C. Both require the train message's one ArrayRecord and one ConfigRecord, and reply keys
    in the order received, which is the layout this app uses."""
    dp = AppConfig.from_flat(context.run_config).dp
    if dp.mode == "client-clip":
        return fixedclipping_mod(msg, context, call_next)
    if dp.mode == "local":
        return AnalyticLocalDpMod(dp.clipping_norm, 2 * dp.clipping_norm, dp.local_epsilon, dp.delta)(
            msg, context, call_next
        )
    return call_next(msg, context)


def wire_mod(msg: Message, context: Context, call_next) -> Message:
    """retriever.wire-dtype = float16: the reply's retriever arrays become the update (trained − received) in fp16.
    Outside the DP mods, so they clip and noise fp32 weights against what was received, as they expect;
    the server adds the update back to the fp32 global it sent."""
    dtype = AppConfig.from_flat(context.run_config).retriever.wire_dtype
    reply = call_next(msg, context)
    if dtype == "float32" or reply.has_error():
        return reply
    arrays = to_wire_update(reply.content["arrays"], msg.content["arrays"], dtype)
    reply.content["arrays"] = arrays
    reply.content["metrics"]["bytes-sent"] = arrays.count_bytes()
    return reply


def disclosure_mod(msg: Message, context: Context, call_next) -> Message:
    """Under any dp.mode but off, what leaves the node is covered by DP: the reply's MetricRecord keeps only public
    values (disclosure.PUBLIC: the weight, the LoRA rank, bytes sent, the round); the values computed on the node's
    data are withheld, or, with node-config dp-share-metrics = true, sent un-noised in the ConfigRecord
    'dp-unprotected' (logged here) for the server to report as not DP-protected. Without that opt-in an evaluate
    message is not even computed. Outermost mod: it sees the reply as it leaves."""
    run = AppConfig.from_flat(context.run_config)
    if run.dp.mode == "off":
        return call_next(msg, context)
    share = node_data(run, context.node_config).share_metrics
    if not share and msg.metadata.message_type.startswith("evaluate"):
        return Message(RecordDict({"metrics": metric_record(_dp_weight(run))}), reply_to=msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    public, private = split_private(dict(reply.content["metrics"]))
    reply.content["metrics"] = MetricRecord(public)
    if share:
        reply.content[UNPROTECTED] = ConfigRecord(private)
        log(WARNING, "dp.mode=%s with %s = true: sending un-noised %s", run.dp.mode, SHARE_KEY, ", ".join(private))
    else:
        log(INFO, "dp.mode=%s: withheld %s (node-config %s = false)", run.dp.mode, ", ".join(private), SHARE_KEY)
    return reply


def _dp_weight(cfg: AppConfig) -> dict[str, int]:
    """Under DP every node weighs the same, and the server's FedAvg reads this key in train and evaluate replies alike.
    Weighting by example counts would need the counts, computed on private data and not covered by the mechanism;
    central DP's noise is moreover calibrated to C / nodes, which unequal weights would break."""
    return {"dp-weight": 1} if cfg.dp.mode != "off" else {}


def _open_store(setup: NodeSetup, retriever: DualEncoder) -> KnowledgeStore:
    return KnowledgeStore.open(
        **setup.store,
        embedding_model=retriever.name,
        dim=retriever.dim,
        context_fingerprint=retriever.context_fingerprint(),
    )


def _models_at_global_weights(msg: Message, setup: NodeSetup, clock: MessageClock) -> tuple[Generator, DualEncoder]:
    """The models (loaded once per process, at this node's LoRA rank) set to the global weights in the message: a
    node of lower rank than the global adapter takes its truncation (fed.lora-aggregation = fedavg) or its best
    rank-r approximation (product); the server recomputes the same to average its update."""
    from fedrag_app.federation.exchange import at_node_rank, load_received_state

    gen, retriever = _models(setup.cfg)
    clock.mark("models")
    state = at_node_rank(record_to_numpy(msg.content["arrays"]), setup.run, setup.cfg)
    load_received_state(setup.cfg, gen, retriever, state)
    return gen, retriever


def _round_of(msg: Message, context: Context) -> RoundOf:
    """The absolute round (a resumed run's server counts from 1 again and sends the rounds done before)."""
    from fedrag_app.federation.personal import RoundOf

    config = msg.content["config"]
    offset = int(config.get("round-offset", 0))
    return RoundOf(run_id=context.run_id, server_round=int(config["server-round"]) + offset, round_offset=offset)


@app.train(mods=[disclosure_mod, wire_mod, privacy_mod])
def train(msg: Message, context: Context) -> Message:
    started, clock = time.perf_counter(), MessageClock(msg, context, _IMPORTED_AT)
    from fedrag_app.core.torch_runtime import release_memory
    from fedrag_app.federation.exchange import outgoing_state
    from fedrag_app.federation.personal import personal_adapter
    from fedrag_app.rag.generator import lora_a_fingerprint
    from fedrag_app.training.local_round import run_local_round

    clock.mark("imports")
    setup = node_setup(context.run_config, context.node_config)
    cfg, node = setup.cfg, setup.node
    gen, retriever = _models_at_global_weights(msg, setup, clock)
    examples, _ = node_questions(node, cfg.partition.heldout_fraction)
    at = _round_of(msg, context)
    kept = load_optimizer_state(context.state) if cfg.train.keep_optimizer_state else None
    clock.mark("weights")  # the global weights in, the node's questions read
    with (
        _open_store(setup, retriever) as store,
        personal_adapter(cfg, gen, node.state_dir, node.partition_id, at, keep=True),
    ):
        clock.mark("shard")
        result = run_local_round(
            cfg,
            gen,
            retriever,
            store,
            examples,
            server_round=at.server_round,
            optimizer_state=kept,
            mmlu=node_mmlu(node, cfg),
        )
        clock.mark("compute")
    if kept is not None:  # the node's AdamW state stays in its own context.state, never in the reply
        save_optimizer_state(context.state, kept)
    arrays = numpy_to_record(outgoing_state(cfg, gen, retriever))  # fp32: wire_mod casts the retriever update
    release_memory()  # the round's activations and optimizer states: other actors on this GPU may need them
    metrics = metric_record(
        {
            "num-examples": result.num_examples,
            **result.metrics,
            **_dp_weight(cfg),
            "lora-rank": cfg.generator.lora_r,
            "bytes-sent": arrays.count_bytes(),
            "handler-seconds": time.perf_counter() - started,
        }
    )  # incl. model load, unpack, pack
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    if cfg.fed.lora_aggregation == "ffa":  # the server checks every node froze the same A; not a metric to average
        content[CHECKS] = ConfigRecord({A_FINGERPRINT: lora_a_fingerprint(gen)})
    clock.done()
    return Message(content, reply_to=msg)


@app.evaluate(mods=[disclosure_mod])
def evaluate(msg: Message, context: Context) -> Message:
    clock = MessageClock(msg, context, _IMPORTED_AT)
    from fedrag_app.core.torch_runtime import release_memory
    from fedrag_app.evaluation.evaluate import evaluate_retrieval, evaluate_web_questions
    from fedrag_app.federation.personal import personal_adapter
    from fedrag_app.rag.retrieval import retrieve

    clock.mark("imports")
    setup = node_setup(context.run_config, context.node_config)
    cfg, node = setup.cfg, setup.node
    gen, retriever = _models_at_global_weights(msg, setup, clock)
    _, heldout = node_questions(node, cfg.partition.heldout_fraction)
    depth = max(cfg.eval.top_k, cfg.eval.recall_k)
    clock.mark("weights")
    with _open_store(setup, retriever) as store:
        clock.mark("shard")
        hits = retrieve(retriever, store, [e.question for e in heldout], depth)

    def answer_heldout() -> dict[str, float]:
        return evaluate_web_questions(
            gen,
            heldout,
            hits,
            top_k=cfg.eval.top_k,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.generator.max_new_tokens,
        )

    scores = answer_heldout()
    if cfg.fed.personal_adapter:  # the global model above; the node's personalised model (global + its own) here
        with personal_adapter(cfg, gen, node.state_dir, node.partition_id, _round_of(msg, context), keep=False):
            personal = answer_heldout()
        scores.update({f"personal-{k}": v for k, v in personal.items()})
    scores.update(evaluate_retrieval(hits, heldout, cfg.eval.recall_k))
    clock.mark("compute")
    metrics = metric_record(
        {"num-examples": len(heldout), **_dp_weight(cfg), **{f"client-{k}": v for k, v in scores.items()}}
    )
    release_memory()
    clock.done()
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("retrieve")
def retrieve_passages(msg: Message, context: Context) -> Message:
    """Top-k passages per question from this node's shard, only if it opted in (federation.query.opted_in) and within
    its node-config bounds (query-max-k per question, query-max-questions per run, counted in context.state): a
    message over them gets an error reply, logged here. The server sends query vectors encoded with the retriever it
    answers with (e.g. a checkpoint's trained query encoder; the shard is checked against its embedding model);
    without them the node encodes the questions itself."""
    started, clock = time.perf_counter(), MessageClock(msg, context, _IMPORTED_AT)
    setup = node_setup(context.run_config, context.node_config)
    cfg, node = setup.cfg, setup.node
    if not opted_in(context.node_config, node.federated_retrieval, node.partition_id, cfg.query.opted_in):
        raise ConfigError(
            f"{REFUSAL}: passage text stays here unless its node-config sets federated-retrieval=true "
            "(in simulation: run-config query.opted-in-partitions)"
        )
    query = msg.content["query"]
    questions = [str(q) for q in query["questions"]] if "questions" in query else [str(query["question"])]
    top_k = int(query.get("top-k", cfg.eval.top_k))
    answered = int(context.state[QUERY_ANSWERED]["questions"]) if QUERY_ANSWERED in context.state else 0
    if problem := over_limits(len(questions), top_k, answered, node.query_max_questions, node.query_max_k):
        log(WARNING, "query.retrieve refused: %s", problem)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=problem), reply_to=msg)
    fingerprint = None  # the shard must hold the context encoder the query vectors were made for, when the server says
    if "vectors" in query:
        vectors, model = np.asarray(query["vectors"], dtype=np.float32), str(query["embedding-model"])
        fingerprint = str(query["context-fingerprint"]) if "context-fingerprint" in query else None
        if not questions or vectors.size % len(questions):
            raise ConfigError(f"{vectors.size} query vector values do not split into {len(questions)} vectors")
        vectors = vectors.reshape(len(questions), -1)
    else:
        _, retriever = _models(cfg)
        clock.mark("models")
        vectors, model, fingerprint = (
            retriever.encode_queries(questions).cpu().numpy(),
            retriever.name,
            retriever.context_fingerprint(),
        )
    with KnowledgeStore.open(
        **setup.store, embedding_model=model, dim=vectors.shape[1], context_fingerprint=fingerprint
    ) as store:
        clock.mark("shard")
        hits = store.search_batch(vectors, top_k)
        clock.mark("compute")
    docs = pack_hits(hits)
    context.state[QUERY_ANSWERED] = ConfigRecord({"questions": answered + len(questions)})
    if "partition-id" in context.node_config:  # where the passages come from: part of the answer, not a metric
        docs["partition-id"] = node.partition_id
    metrics = metric_record({"node-seconds": time.perf_counter() - started})
    clock.done()
    return Message(RecordDict({"docs": ConfigRecord(docs), "metrics": metrics}), reply_to=msg)


_IMPORTED_AT = stamp()  # this module and what it imports are loaded (message_clock: process start to here)
