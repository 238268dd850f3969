"""A federation of 5 institutions of which one is malicious, run in-process: the server's real strategy
(build_strategy, as the ServerApp builds it) drives rounds of the real ClientApp's train handler (real RALT on the
tiny models, tests/tiny_models.py), and the global adapter's held-out loss is measured after the last round. Used by
tests/test_malicious_institution.py and benchmarks/bench_robustness.py (the figures in docs/ROBUSTNESS.md).

The malicious node trains honestly, then sends the round's global weights plus ``attack`` x its update: 1000 (a
scaled update) or -1 (a sign-flipped one). The adapter wraps the output head too, so a bad update shows in the loss:
the tiny model's final RMSNorm bounds whatever LoRA does to q/v, but not the head's logits.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from fedrag_app.config.app_config import AppConfig
from fedrag_app.data.loaders import QAExample, load_web_questions, write_qa_jsonl
from fedrag_app.federation.exchange import load_received_state, outgoing_state
from fedrag_app.flower import client_app
from fedrag_app.flower.records import numpy_to_record, record_to_numpy
from fedrag_app.flower.strategies import build_strategy
from fedrag_app.rag.lm_scoring import answer_nll
from fedrag_app.training.sequences import build_sequence, collate
from tests.flower_helpers import Nodes, context, message, reply

NODES = 5
MALICIOUS = NODES  # node id 5, partition 4
QUESTIONS_PER_NODE = 8  # distinct Web Questions train questions per node
HELDOUT = 32  # the first Web Questions test questions: no node trains on them
ROUNDS = 3
ATTACKS = {"scaled": 1000.0, "sign-flipped": -1.0}

RUN = {
    "runtime.device": "cpu",
    "runtime.num-threads": 1,
    "train.mode": "ralt",
    "train.num-examples": 0,  # all of a node's 8 questions every round
    "train.epochs": 2,  # 4 AdamW steps of 4 questions per round
    "ralt.batch-size": 4,
    "ralt.top-k": 1,
    "ralt.max-seq-len": 128,
    "ralt.learning-rate": 1e-2,
    "generator.lora-target-modules": "q_proj,v_proj,lm_head",
    "generator.lora-dropout": 0.0,
    "partition.heldout-fraction": 0.0,
    "fed.min-nodes": NODES,
    "fed.server-eval": False,
    "fed.fraction-evaluate": 0.0,
}


@dataclass
class Federation:
    run: dict  # RUN with the tiny models
    nodes: list[dict]  # each node's node-config: its own questions, a shared copy of the shard
    heldout: list[QAExample]
    initial: dict[str, np.ndarray]  # the global weights before round 1

    def heldout_loss(self, state: dict[str, np.ndarray]) -> float:
        """RALT's loss (mean answer-token NLL, closed book) of the global weights on the held-out questions."""
        cfg = AppConfig.from_flat(self.run)
        gen, retriever = client_app._models(cfg)
        load_received_state(cfg, gen, retriever, state)
        sequences = [build_sequence(gen.tokenizer, e.question, None, e.target, 128) for e in self.heldout]
        with torch.no_grad():
            return float(answer_nll(gen.model, **collate(sequences, gen.tokenizer.pad_token_id, gen.device)))

    def train(self, extra: dict, attack: float | None = None, rounds: int = ROUNDS) -> float:
        """``rounds`` rounds of the strategy the run config (+ ``extra``) names; the held-out loss after them."""
        run = {**self.run, **extra}
        strategy = build_strategy(AppConfig.from_flat(run), self.initial, None)
        contexts = [context(nc, run) for nc in self.nodes]
        x = dict(self.initial)
        for r in range(1, rounds + 1):
            replies = []
            for m in strategy.configure_train(r, numpy_to_record(x), ConfigRecord({}), Nodes(NODES)):
                node = m.metadata.dst_node_id
                content = RecordDict({"arrays": numpy_to_record(x), "config": ConfigRecord(dict(m.content["config"]))})
                out = client_app.app(message(content, "train", dst=node), contexts[node - 1])
                assert not out.has_error(), out.error
                if node == MALICIOUS and attack is not None:
                    y = record_to_numpy(out.content["arrays"])
                    out.content["arrays"] = numpy_to_record(
                        {k: (x[k] + attack * (v - x[k])).astype(v.dtype) for k, v in y.items()}
                    )
                replies.append(reply(out.content, node))
            arrays, _ = strategy.aggregate_train(r, replies)
            assert arrays is not None, f"round {r} aggregated nothing"
            x = record_to_numpy(arrays)
        return self.heldout_loss(x)


def federation(root: Path, shard: Path, models: dict[str, str]) -> Federation:
    """5 nodes with distinct questions under ``root``, each reading a copy of ``shard`` (opened per message)."""
    data = AppConfig().data
    questions = load_web_questions("train", data)
    store = root / "shard"
    if not store.exists():
        shutil.copytree(shard, store)
    nodes = []
    for i in range(NODES):
        folder = root / f"node-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        write_qa_jsonl(folder / "train.jsonl", questions[i * QUESTIONS_PER_NODE : (i + 1) * QUESTIONS_PER_NODE])
        nodes.append(
            {
                "partition-id": i,
                "num-partitions": NODES,
                "data-path": str(folder / "train.jsonl"),
                "store-path": str(store),
                "state-path": str(folder / "state"),
            }
        )
    run = {**RUN, **models}
    cfg = AppConfig.from_flat(run)
    initial = {k: v.copy() for k, v in outgoing_state(cfg, *client_app._models(cfg)).items()}
    return Federation(run, nodes, load_web_questions("test", data, limit=HELDOUT), initial)
