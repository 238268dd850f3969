"""The ServerApp's query task (fed.task = "query"): federated RAG at question time over Flower messages.

Each batch of questions goes to every node as one query.retrieve message (with the query vectors of the retriever
that answers: a checkpoint's or the base one); the replies that arrive within query.timeout-s are checked and merged
(federation/query: replies, merge), the generator answers from the merged top eval.top-k passages (answering). A node
that refuses, errs, sends a bad reply or is late is counted and the others answer.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedrag_app.config.app_config import AppConfig
from fedrag_app.config.query import QueryConfig
from fedrag_app.config.runtime import apply_runtime
from fedrag_app.core.errors import CheckpointError
from fedrag_app.data.loaders import QAExample
from fedrag_app.federation.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint
from fedrag_app.federation.query.answering import answer_and_score
from fedrag_app.federation.query.merge import NodeHit, merge
from fedrag_app.federation.query.outputs import ANSWER_LOG, METRICS_LOG, log_row, write_outputs
from fedrag_app.federation.query.questions import load_questions
from fedrag_app.federation.query.replies import REPLY_KINDS, read_reply
from fedrag_app.rag.generator import Generator, load_generator
from fedrag_app.rag.retriever import DualEncoder, load_retriever


def run_query(grid: Grid, cfg: AppConfig, out: Path) -> None:
    """Ask every question of the run (query.question, a file, or Web Questions test) across the nodes, answer each,
    write answers.jsonl and query-metrics.json to the output folder and log each answer (for `fedrag-app ask`)."""
    q, started, clock, counts = (
        cfg.query,
        time.perf_counter(),
        {"encode": 0.0, "round-trip": 0.0, "node": 0.0},
        Counter(),
    )
    gen, retriever = answering_models(cfg, out)
    examples, nodes = load_questions(cfg), nodes_up(grid, cfg.fed.min_nodes, q.timeout_s)
    merged, depth = [], max(cfg.eval.top_k, cfg.eval.recall_k)
    for start in range(0, len(examples), q.batch_size):
        batch, t0 = examples[start : start + q.batch_size], time.perf_counter()
        vectors = retriever.encode_queries([e.question for e in batch]).cpu().numpy()
        t1 = time.perf_counter()
        replies = list(
            grid.send_and_receive(retrieve_messages(batch, vectors, retriever, q, nodes, start), timeout=q.timeout_s)
        )
        lists, node_seconds = read_replies(replies, len(batch), q.top_k_per_node, counts)
        counts["timeout"] += len(nodes) - len(replies)
        merged += [merge(hits, q.merge, rrf_k=q.rrf_k, top=depth) for hits in lists]
        clock["encode"] += t1 - t0
        clock["round-trip"] += time.perf_counter() - t1
        clock["node"] += node_seconds
    rows, metrics = answer_and_score(cfg, gen, examples, merged, clock)
    metrics.update(
        {
            "nodes": len(nodes),
            **{f"replies-{k}": counts[k] for k in REPLY_KINDS},
            "seconds": time.perf_counter() - started,
        }
    )
    report(out, rows, metrics, cfg.eval.top_k)


def answering_models(cfg: AppConfig, out: Path) -> tuple[Generator, DualEncoder]:
    """The generator and retriever that answer: the base models, with query.checkpoint's weights when it names one
    ("latest" = the last complete checkpoint in the output folder)."""
    device = apply_runtime(cfg.runtime)
    gen, retriever = load_generator(cfg.generator, device=device), load_retriever(cfg.retriever, device=device)
    q = cfg.query
    if q.checkpoint:
        ckpt = latest_checkpoint(out) if q.checkpoint == "latest" else Checkpoint(0, Path(q.checkpoint))
        if ckpt is None:
            raise CheckpointError(f"run-config key 'query.checkpoint' = 'latest': no complete checkpoint in {out}")
        load_checkpoint(ckpt, gen, retriever)
    return gen, retriever


def retrieve_messages(
    batch: list[QAExample], vectors, retriever: DualEncoder, q: QueryConfig, nodes: list[int], start: int
) -> list[Message]:
    """One query.retrieve message per node for a batch of questions: the questions, their query vectors, top-k and
    the encoder's name and fingerprint (a node checks them against its shard)."""
    return [
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


def read_replies(
    replies: list[Message], n_questions: int, top_k: int, counts: Counter
) -> tuple[list[list[list[NodeHit]]], float]:
    """Per question, the passage lists of the replies (one per reply; empty for a reply that is not ok), and the
    slowest node's own seconds; each reply's kind is counted in ``counts`` and a problem logged."""
    lists: list[list[list[NodeHit]]] = [[] for _ in range(n_questions)]
    node_seconds = [0.0]
    for m in replies:
        kind, per_question, seconds, problem = read_reply(m, n_questions, top_k)
        counts[kind] += 1
        if problem:
            log(WARNING, "query.retrieve: node %s: %s: %s", m.metadata.src_node_id, kind, problem)
        node_seconds.append(seconds)
        for hits, got in zip(lists, per_question):
            hits.append(got)
    return lists, max(node_seconds)


def report(out: Path, rows: list[dict], metrics: dict, top_k: int) -> None:
    """answers.jsonl and query-metrics.json in the output folder; one log line per answer and one for the metrics,
    which is how `fedrag-app ask --federation` reads them back (`flwr log`) from a SuperLink elsewhere."""
    write_outputs(out, rows, metrics)
    for row in rows:
        log(INFO, "%s %s", ANSWER_LOG, json.dumps(log_row(row, top_k), ensure_ascii=False))
    log(INFO, "%s %s", METRICS_LOG, json.dumps(metrics))


def nodes_up(grid: Grid, wanted: int, timeout_s: float) -> list[int]:
    """The connected nodes, once fed.min-nodes are up or after query.timeout-s (then whoever is there)."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := sorted(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
    log(INFO, "asking %s node(s)", len(nodes))
    return nodes
