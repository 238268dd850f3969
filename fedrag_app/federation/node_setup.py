"""A node's setup for one message, resolved once from the run-config and node-config mappings Flower hands it:
the run's config as the server has it, the node's own config (its LoRA rank), and where its data and shard live."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrag_app.config.app_config import AppConfig
from fedrag_app.config.values import check_federated
from fedrag_app.federation.node_data import NodeData, node_data


@dataclass(frozen=True)
class NodeSetup:
    run: AppConfig  # the run-config as the server has it: generator.lora-r is the global rank, what travels
    cfg: AppConfig  # this node's own config: run at the node's LoRA rank (AppConfig.for_rank)
    node: NodeData  # its questions, shard, state folder, opt-in to federated retrieval

    @property
    def rank(self) -> int:
        """The LoRA rank this node trains."""
        return self.cfg.generator.lora_r

    @property
    def store(self) -> dict[str, str]:
        """Its shard: KnowledgeStore.open kwargs ({"path": …} or {"url": …, "collection": …})."""
        return self.node.store

    @property
    def state_dir(self) -> Path:
        return self.node.state_dir

    @property
    def partition_id(self) -> int:
        return self.node.partition_id


def node_setup(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> NodeSetup:
    """Parse and check the run-config (a federated run refuses centralized-only options), find the node's data
    (node_data) and its LoRA rank (node-config lora-rank, else fed.client-ranks, else generator.lora-r)."""
    run = AppConfig.from_flat(run_config)
    check_federated(run)
    node = node_data(run, node_config)
    return NodeSetup(run=run, cfg=run.for_rank(run.node_rank(node.partition_id, node.lora_rank)), node=node)
