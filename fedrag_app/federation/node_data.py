"""Where a node's data lives: from its node-config on a real SuperNode, or from the partition manifest in simulation.

Node-config keys (docs/FEDERATION.md), all optional in simulation where only partition-id/num-partitions exist:
  data-path          absolute path of the node's training questions (JSONL: question, answers)
  heldout-path       absolute path of its held-out questions; without it, the last partition.heldout-fraction
                     of data-path is held out (and not trained on)
  store-path         absolute path of its Qdrant Edge shard            (one of store-path / store-url)
  store-url          URL of its own Qdrant server
  store-collection   collection on that server (default: store.collection)
  federated-retrieval  true to answer query.retrieve messages (sends passage text off the node); default false
  state-path         absolute folder for what the node keeps between rounds (its personal adapter);
                     default: node-state-<partition-id> beside its training questions
  lora-rank          the LoRA rank this node trains (less compute than the global generator.lora-r); the server
                     pads its reply back to the global rank; default: fed.client-ranks, else generator.lora-r
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.errors import ConfigError
from fedrag_app.data.loaders import QAExample, load_qa_jsonl
from fedrag_app.federation.partition import MANIFEST, partitions_dir

NODE_KEYS = {
    "partition-id": int,
    "num-partitions": int,
    "data-path": str,
    "heldout-path": str,
    "store-path": str,
    "store-url": str,
    "store-collection": str,
    "federated-retrieval": bool,
    "state-path": str,
    "lora-rank": int,
}


@dataclass(frozen=True)
class NodeData:
    partition_id: int
    train_path: Path
    heldout_path: Path | None
    store: dict[str, str]  # KnowledgeStore.open kwargs: {"path": …} or {"url": …, "collection": …}
    federated_retrieval: bool = False
    state_path: Path | None = None  # node-config state-path, if given
    lora_rank: int | None = None  # node-config lora-rank, if given

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
        return NodeData(
            pid,
            Path(nc["data-path"]),
            heldout,
            store,
            bool(nc.get("federated-retrieval", False)),
            Path(nc["state-path"]) if "state-path" in nc else None,
            nc.get("lora-rank"),
        )
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
    return NodeData(
        pid,
        Path(entry["train"]),
        Path(entry["heldout"]),
        {"path": entry["shard"]},
        bool(nc.get("federated-retrieval", False)),
        Path(nc["state-path"]) if "state-path" in nc else None,
        nc.get("lora-rank"),
    )


def node_questions(node: NodeData, heldout_fraction: float) -> tuple[list[QAExample], list[QAExample]]:
    """(training questions, held-out questions) of this node."""
    questions = load_qa_jsonl(node.train_path)
    if node.heldout_path is not None:
        return questions, load_qa_jsonl(node.heldout_path)
    n_heldout = min(len(questions) - 1, max(1, round(heldout_fraction * len(questions)))) if len(questions) > 1 else 0
    return questions[: len(questions) - n_heldout], questions[len(questions) - n_heldout :]
