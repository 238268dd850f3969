"""What a node's reply may disclose under differential privacy, and how the server reads it back. No Flower here.

A DP mechanism covers the weights only (clipped, and noised on the node or by the server). Every other value a node
computes from its private data — losses, LSR's KL and entropies, example and step counts, timings, held-out scores —
would leave un-noised beside them, and the guarantee would not hold for the reply. So under any dp.mode but off a
reply's MetricRecord keeps only PUBLIC values, those fixed by the run's config and the message received, and the
rest is withheld, unless the node's own node-config sets dp-share-metrics = true: then they travel in a separate
ConfigRecord (UNPROTECTED), never averaged by Flower as if they were covered, and the server reports them by name as
not DP-protected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# the FedAvg weight (1 under DP), the node's LoRA rank, the bytes of the (shape-determined) arrays, the round number
PUBLIC = frozenset({"dp-weight", "lora-rank", "bytes-sent", "server-round"})
UNPROTECTED = "dp-unprotected"  # a reply's ConfigRecord of the values a node opted to send un-noised
SHARE_KEY = "dp-share-metrics"  # the node-config key that opts in


def split_private(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(public values, values computed on the node's private data) of a reply's metrics."""
    public = {k: v for k, v in metrics.items() if k in PUBLIC}
    return public, {k: v for k, v in metrics.items() if k not in PUBLIC}


def unprotected_means(shared: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each un-noised value averaged over the nodes that sent it, with equal weights: under DP the example counts
    that FedAvg weights by are themselves private (a node that shares them sends them here as 'num-examples')."""
    keys = sorted({k for values in shared for k in values})
    return {k: sum(float(v[k]) for v in shared if k in v) / sum(1 for v in shared if k in v) for k in keys}
