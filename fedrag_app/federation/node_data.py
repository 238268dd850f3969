"""Where a node's data lives: from its node-config on a real SuperNode, or from the partition manifest in simulation.

Node-config keys (docs/FEDERATION.md), all optional in simulation where only partition-id/num-partitions exist:
  data-path          absolute path of the node's training questions (JSONL: question, answers)
  heldout-path       absolute path of its held-out questions; without it, the last partition.heldout-fraction
                     of data-path is held out (and not trained on)
  mmlu-path          absolute path of its multiple-choice questions for RALT's mixture (MMLU layout: question,
                     choices, answer, subject); needed only with ralt.mmlu-ratio > 0
  store-path         absolute path of its Qdrant Edge shard            (one of store-path / store-url)
  store-url          URL of its own Qdrant server
  store-collection   collection on that server (default: store.collection)
  federated-retrieval  true to answer query.retrieve messages (sends passage text off the node); default false
  state-path         absolute folder for what the node keeps between rounds (its personal adapter);
                     default: node-state-<partition-id> beside its training questions
  lora-rank          the LoRA rank this node trains (less compute than the global generator.lora-r); the server
                     pads its reply back to the global rank; default: fed.client-ranks, else generator.lora-r
  query-max-questions  most questions this node answers in one query run (query.retrieve messages of one run
                     together); a message over it gets an error reply; default 1000
  query-max-k        most passages it returns per question (1..100); default 20
  dp-share-metrics   true to send, under a DP mode, the values computed on its private data that no DP mechanism
                     covers (losses, example counts, held-out scores, timings): logged on the node; default false
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrag_app.config.app_config import AppConfig
from fedrag_app.config.query import MAX_TOP_K_PER_NODE
from fedrag_app.core.errors import ConfigError
from fedrag_app.data.loaders import (
    MmluQuestion,
    QAExample,
    excluded_mmlu_subjects,
    load_mmlu_jsonl,
    load_qa_jsonl,
)
from fedrag_app.federation.partition import MANIFEST, partitions_dir

NODE_KEYS = {
    "partition-id": int,
    "num-partitions": int,
    "data-path": str,
    "heldout-path": str,
    "mmlu-path": str,
    "store-path": str,
    "store-url": str,
    "store-collection": str,
    "federated-retrieval": bool,
    "state-path": str,
    "lora-rank": int,
    "query-max-questions": int,
    "query-max-k": int,
    "dp-share-metrics": bool,
}
QUERY_MAX_QUESTIONS, QUERY_MAX_K = 1000, 20  # a node's default bounds on one query run (docs/FEDERATION.md)


@dataclass(frozen=True)
class NodeData:
    partition_id: int
    train_path: Path
    heldout_path: Path | None
    store: dict[str, str]  # KnowledgeStore.open kwargs: {"path": …} or {"url": …, "collection": …}
    federated_retrieval: bool = False
    state_path: Path | None = None  # node-config state-path, if given
    lora_rank: int | None = None  # node-config lora-rank, if given
    mmlu_path: Path | None = None  # its multiple-choice questions (ralt.mmlu-ratio), if any
    query_max_questions: int = QUERY_MAX_QUESTIONS  # most questions it answers in one query run
    query_max_k: int = QUERY_MAX_K  # most passages it returns per question
    share_metrics: bool = False  # dp-share-metrics: send un-noised values computed on its data under DP

    @property
    def state_dir(self) -> Path:
        """Where the node keeps state between rounds (never sent): its personal adapter."""
        return self.state_path or self.train_path.parent / f"node-state-{self.partition_id}"


def _checked(node_config: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in node_config.items():
        if key not in NODE_KEYS:
            raise ConfigError(f"node-config key '{key}' is unknown; known keys: {', '.join(sorted(NODE_KEYS))}")
        kind = NODE_KEYS[key]
        if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"node-config key '{key}' = {value!r}: expected {kind.__name__}")
        if key.endswith("-path") and not Path(value).is_absolute():
            raise ConfigError(f"node-config key '{key}' = {value!r}: must be an absolute path")
        if key == "query-max-questions" and value < 1:
            raise ConfigError(f"node-config key '{key}' = {value!r}: must be at least 1")
        if key == "query-max-k" and not 1 <= value <= MAX_TOP_K_PER_NODE:
            raise ConfigError(f"node-config key '{key}' = {value!r}: must be in 1..{MAX_TOP_K_PER_NODE}")
        out[key] = value
    return out


def node_data(cfg: AppConfig, node_config: Mapping[str, Any]) -> NodeData:
    """Explicit node-config paths win (real SuperNode); otherwise the manifest entry for partition-id."""
    nc = _checked(node_config)
    pid = int(nc.get("partition-id", 0))
    if "data-path" in nc:
        if "store-path" in nc and "store-url" in nc:
            raise ConfigError("node-config sets both 'store-path' and 'store-url': give one")
        if "store-url" in nc:
            store = {"url": nc["store-url"], "collection": nc.get("store-collection", cfg.store.collection)}
        elif "store-path" in nc:
            store = {"path": nc["store-path"]}
        else:
            raise ConfigError("node-config needs 'store-path' (Qdrant Edge shard) or 'store-url' (Qdrant server)")
        heldout = Path(nc["heldout-path"]) if "heldout-path" in nc else None
        return NodeData(pid, Path(nc["data-path"]), heldout, store, **_own_settings(nc))
    manifest_path = partitions_dir(cfg.partition) / MANIFEST
    if not manifest_path.exists():
        raise ConfigError(
            f"no partition manifest at {manifest_path}: run `fedrag-app partition` first, or set "
            "run-config partition.dir (absolute) / node-config data-path and store-path"
        )
    clients = json.loads(manifest_path.read_text())["clients"]
    if not 0 <= pid < len(clients):
        raise ConfigError(f"partition-id {pid} is outside the {len(clients)} partitions in {manifest_path}")
    entry = clients[pid]
    settings = _own_settings(nc)
    if settings["mmlu_path"] is None and "mmlu" in entry:  # partitions written before the mixture have none
        settings["mmlu_path"] = Path(entry["mmlu"])
    return NodeData(pid, Path(entry["train"]), Path(entry["heldout"]), {"path": entry["shard"]}, **settings)


def _own_settings(nc: Mapping[str, Any]) -> dict[str, Any]:
    """What a node decides for itself, wherever its data comes from (checked node-config, defaults otherwise)."""
    return {
        "federated_retrieval": bool(nc.get("federated-retrieval", False)),
        "state_path": Path(nc["state-path"]) if "state-path" in nc else None,
        "lora_rank": nc.get("lora-rank"),
        "mmlu_path": Path(nc["mmlu-path"]) if "mmlu-path" in nc else None,
        "query_max_questions": nc.get("query-max-questions", QUERY_MAX_QUESTIONS),
        "query_max_k": nc.get("query-max-k", QUERY_MAX_K),
        "share_metrics": bool(nc.get("dp-share-metrics", False)),
    }


def node_questions(node: NodeData, heldout_fraction: float) -> tuple[list[QAExample], list[QAExample]]:
    """(training questions, held-out questions) of this node."""
    questions = load_qa_jsonl(node.train_path)
    if node.heldout_path is not None:
        return questions, load_qa_jsonl(node.heldout_path)
    n_heldout = min(len(questions) - 1, max(1, round(heldout_fraction * len(questions)))) if len(questions) > 1 else 0
    return questions[: len(questions) - n_heldout], questions[len(questions) - n_heldout :]


def node_mmlu(node: NodeData, cfg: AppConfig) -> list[MmluQuestion]:
    """The node's multiple-choice questions for RALT's mixture, without any subject this run evaluates or excludes;
    [] when the mixture is off. Mixture on but no file is an error naming what to set."""
    if cfg.ralt.mmlu_ratio == 0:
        return []
    if node.mmlu_path is None:
        raise ConfigError(
            f"ralt.mmlu-ratio = {cfg.ralt.mmlu_ratio} needs the node's multiple-choice questions: set node-config "
            "mmlu-path, or re-run `fedrag-app partition` (it writes client-<i>/mmlu.jsonl)"
        )
    excluded = excluded_mmlu_subjects(cfg)
    return [q for q in load_mmlu_jsonl(node.mmlu_path) if q.subject not in excluded]
