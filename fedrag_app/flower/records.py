"""The Flower edge: weights and metrics in and out of Flower records. With strategies.py (Flower's server optimizers)
the only library modules importing flwr.

One ArrayRecord carries both models, keys prefixed "lora.<peft key>" and "retriever.<param>" (Flower's
reply contract wants exactly one ArrayRecord and one MetricRecord). Arrays travel as fp32, never bf16 (numpy has no
bf16); with retriever.wire-dtype = float16 a node's reply carries its retriever *update* in fp16 (to_wire_update) and
the server adds it back to the fp32 global it sent (from_wire_update): fp16 keeps ~3 digits of an update, where
rounding whole weights to fp16 loses most of a small one. Unpacking checks keys, shapes and finiteness against what
the receiver expects, so a bad update is refused by name instead of being loaded.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedrag_app.core.errors import WeightsError
from fedrag_app.federation.update_checks import check_update

LORA, RETRIEVER = "lora.", "retriever."


def pack_weights(
    lora: dict[str, torch.Tensor], retriever: dict[str, torch.Tensor], *, retriever_dtype: str = "float32"
) -> ArrayRecord:
    """Both weight sets in one ArrayRecord, in a stable key order."""
    arrays: dict[str, Array] = {}
    for prefix, state, dtype in ((LORA, lora, np.float32), (RETRIEVER, retriever, np.dtype(retriever_dtype))):
        for key in sorted(state):
            arrays[prefix + key] = Array(np.ascontiguousarray(state[key].detach().float().cpu().numpy().astype(dtype)))
    return ArrayRecord(arrays)


def to_wire_update(reply: ArrayRecord, sent: ArrayRecord, dtype: str) -> ArrayRecord:
    """The reply with each retriever array replaced by its update (reply − sent, in fp32) cast to ``dtype``; same keys,
    same order. LoRA arrays pass unchanged."""
    out: dict[str, Array] = {}
    for key, array in reply.items():
        if key.startswith(RETRIEVER):
            update = array.numpy().astype(np.float32) - sent[key].numpy().astype(np.float32)
            array = Array(np.ascontiguousarray(update.astype(np.dtype(dtype))))
        out[key] = array
    return ArrayRecord(out)


def from_wire_update(record: ArrayRecord, sent: dict[str, np.ndarray]) -> ArrayRecord:
    """fp32 weights from a reply of ``to_wire_update``: the sent global plus each retriever update."""
    out: dict[str, Array] = {}
    for key, array in record.items():
        if key.startswith(RETRIEVER):
            update, base = array.numpy(), sent[key]
            if update.shape != base.shape:
                raise ValueError(f"'{key}' has shape {update.shape}, expected {base.shape}")
            array = Array(np.ascontiguousarray(base.astype(np.float32) + update.astype(np.float32)))
        out[key] = array
    return ArrayRecord(out)


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def numpy_to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in state.items()})


def unpack_weights(
    record: ArrayRecord, lora_reference: dict[str, torch.Tensor], retriever_reference: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a record into fp32 (lora, retriever) state dicts, checked against the receiver's own weights."""
    state = record_to_numpy(record)
    reference = {LORA + k: v.numpy() for k, v in lora_reference.items()}
    reference.update({RETRIEVER + k: v.numpy() for k, v in retriever_reference.items()})
    problem = check_update(state, reference)
    if problem:
        raise WeightsError(f"received weights do not fit this model: {problem}")
    lora = {k[len(LORA) :]: torch.from_numpy(v.astype(np.float32)) for k, v in state.items() if k.startswith(LORA)}
    retr = {
        k[len(RETRIEVER) :]: torch.from_numpy(v.astype(np.float32)) for k, v in state.items() if k.startswith(RETRIEVER)
    }
    return lora, retr


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
    for phase, entries in kept.items():
        tensors = {k: v for k, v in entries.items() if isinstance(v, torch.Tensor)}
        state[f"optimizer-{phase}"] = ArrayRecord(
            {k: Array(v.detach().float().cpu().numpy()) for k, v in tensors.items()}
        )
        state[f"optimizer-{phase}-steps"] = ConfigRecord({k: int(v) for k, v in entries.items() if k not in tensors})


def load_optimizer_state(state: RecordDict) -> dict[str, dict]:
    """What save_optimizer_state kept in a node's context.state: {phase: OptimizerState}; {} before its first round."""
    kept: dict[str, dict] = {}
    for key in state.array_records:
        if key.startswith("optimizer-"):
            entries: dict = {k: torch.from_numpy(a.numpy().copy()) for k, a in state[key].items()}
            entries.update({k: int(v) for k, v in state[f"{key}-steps"].items()})
            kept[key[len("optimizer-") :]] = entries
    return kept
