"""The Flower edge of what travels: weights (federation/exchange.py, plain numpy) and metrics in and out of Flower
records, and a node's optimizer state kept in its context.state.

One ArrayRecord carries both models, keys prefixed "lora.<peft key>" and "retriever.<param>" (Flower's reply contract
wants exactly one ArrayRecord and one MetricRecord); exchange.py decides what goes in it and checks what comes out.
Plain numpy at import: torch and exchange.py (which loads the models' libraries) are imported by the functions that
use them, so a ClientApp's query message, in a process of its own in deployment, never pays for them.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

CHECKS = "checks"  # a train reply's ConfigRecord of values the server checks, apart from its metrics
A_FINGERPRINT = "lora-a-fingerprint"  # in CHECKS under FFA-LoRA: rag.generator.lora_a_fingerprint of the node


def to_wire_update(reply: ArrayRecord, sent: ArrayRecord, dtype: str) -> ArrayRecord:
    """exchange.to_wire_update on records: each retriever array becomes its update in ``dtype``."""
    from fedrag_app.federation import exchange

    return numpy_to_record(exchange.to_wire_update(record_to_numpy(reply), record_to_numpy(sent), dtype))


def from_wire_update(record: ArrayRecord, sent: dict[str, np.ndarray]) -> ArrayRecord:
    """exchange.from_wire_update on records: fp32 weights, the sent global plus each retriever update."""
    from fedrag_app.federation import exchange

    return numpy_to_record(exchange.from_wire_update(record_to_numpy(record), sent))


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def numpy_to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in state.items()})


def metric_record(metrics: dict[str, float | int]) -> MetricRecord:
    """Scalars only: a value that is not a number is a programming error, not data to send."""
    for key, value in metrics.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (
            f"metric '{key}' is not a number: {value!r}"
        )
    return MetricRecord({k: float(v) if isinstance(v, float) else int(v) for k, v in metrics.items()})


def save_optimizer_state(state: RecordDict, kept: dict[str, dict]) -> None:
    """Each phase's AdamW state (optimizer_state.py) into a node's context.state: moments in the ArrayRecord
    'optimizer-<phase>', step counts in the ConfigRecord 'optimizer-<phase>-steps'. Never part of a reply."""
    import torch

    for phase, entries in kept.items():
        tensors = {k: v for k, v in entries.items() if isinstance(v, torch.Tensor)}
        state[f"optimizer-{phase}"] = ArrayRecord(
            {k: Array(v.detach().float().cpu().numpy()) for k, v in tensors.items()}
        )
        state[f"optimizer-{phase}-steps"] = ConfigRecord({k: int(v) for k, v in entries.items() if k not in tensors})


def load_optimizer_state(state: RecordDict) -> dict[str, dict]:
    """What save_optimizer_state kept in a node's context.state: {phase: OptimizerState}; {} before its first round."""
    import torch

    kept: dict[str, dict] = {}
    for key in state.array_records:
        if key.startswith("optimizer-"):
            entries: dict = {k: torch.from_numpy(a.numpy().copy()) for k, a in state[key].items()}
            entries.update({k: int(v) for k, v in state[f"{key}-steps"].items()})
            kept[key[len("optimizer-") :]] = entries
    return kept
