"""What travels between the server and the nodes, as plain numpy (no Flower: flower/records.py only wraps it).

One flat state dict carries both models, keys "lora.<peft key>" and "retriever.<param>", sorted within each part,
as fp32 (numpy has no bf16). Here, in one place:
- which parts travel: what train.mode trains (exchanged_parts), and under FFA-LoRA only the B factors;
- a model's weights out (outgoing_state) and received weights in (load_received_state), checked against the
  receiver's own by key, shape and finiteness, so a bad update is refused by name instead of being loaded;
- the checks a reply passes before it is averaged (check_update, check_update_at_rank, check_frozen_a);
- heterogeneous LoRA ranks: the global adapter cut to a node's rank on receipt (at_node_rank);
- retriever.wire-dtype = float16: a node's reply carries its retriever *update* in fp16 (to_wire_update) and the
  server adds it back to the fp32 global it sent (from_wire_update): fp16 keeps ~3 digits of an update, where
  rounding whole weights to fp16 loses most of a small one.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrag_app.config.app_config import AppConfig, FedConfig, TrainConfig
from fedrag_app.core.errors import WeightsError
from fedrag_app.federation.lora_aggregation import to_client_rank, to_global_rank
from fedrag_app.rag.generator import Generator, load_lora_state_dict, lora_state_dict
from fedrag_app.rag.retriever import DualEncoder

LORA, RETRIEVER = "lora.", "retriever."
State = dict[str, np.ndarray]


def exchanged_parts(cfg: TrainConfig) -> tuple[bool, bool]:
    """(LoRA, retriever): what this mode can change, and so all that travels each round.

    RALT never changes the retriever and LSR never changes the adapter, so sending them would only cost bytes
    (88 MB of query encoder per message with the defaults)."""
    return cfg.mode in ("ralt", "ra-dit"), cfg.mode in ("lsr", "ra-dit")


def exchanged_weights(cfg: AppConfig, gen: Generator, retriever: DualEncoder) -> tuple[dict, dict]:
    """The (LoRA, retriever) state dicts that travel; a part that does not travel is {}. Under FFA-LoRA
    (fed.lora-aggregation = ffa) the A factors never change, so only the B factors travel (40% of SmolLM2's
    q/v adapter)."""
    lora, retr = exchanged_parts(cfg.train)
    lora_state = lora_state_dict(gen) if lora else {}
    if cfg.fed.lora_aggregation == "ffa":
        lora_state = {k: v for k, v in lora_state.items() if ".lora_A." not in k}
    return lora_state, (retriever.trainable_state_dict() if retr else {})


def load_exchanged_weights(cfg: AppConfig, gen: Generator, retriever: DualEncoder, lora: dict, retr: dict) -> None:
    if lora:
        load_lora_state_dict(gen, lora, keep_a=cfg.fed.lora_aggregation == "ffa")
    if retr:
        retriever.load_trainable_state_dict(retr)


def flat_state(lora: dict[str, torch.Tensor], retriever: dict[str, torch.Tensor]) -> State:
    """Both weight sets as one prefixed fp32 numpy dict, in a stable key order (LoRA first, each part sorted)."""
    out: State = {}
    for prefix, state in ((LORA, lora), (RETRIEVER, retriever)):
        for key in sorted(state):
            out[prefix + key] = np.ascontiguousarray(state[key].detach().float().cpu().numpy())
    return out


def split_state(
    state: State, lora_reference: dict[str, torch.Tensor], retriever_reference: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A flat state as fp32 (lora, retriever) state dicts, checked against the receiver's own weights."""
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


def outgoing_state(cfg: AppConfig, gen: Generator, retriever: DualEncoder) -> State:
    """What this side sends: the exchanged weights as fp32 (only a node's reply uses the wire dtype, see
    to_wire_update)."""
    return flat_state(*exchanged_weights(cfg, gen, retriever))


def load_received_state(cfg: AppConfig, gen: Generator, retriever: DualEncoder, state: State) -> None:
    """Set the models to received weights (already at this side's rank: at_node_rank); WeightsError when they do
    not fit."""
    load_exchanged_weights(cfg, gen, retriever, *split_state(state, *exchanged_weights(cfg, gen, retriever)))


def rank_method(cfg: FedConfig) -> str:
    """How the global adapter is cut to a lower rank: its first components ('truncate', fed.lora-aggregation =
    fedavg) or its best approximation ('svd', product); the server recomputes the same to average the updates."""
    return "svd" if cfg.lora_aggregation == "product" else "truncate"


def at_node_rank(state: State, run: AppConfig, node: AppConfig) -> State:
    """The global weights the server sent (``run``: generator.lora-r is the global rank) as the node trains them
    (``node``: its own rank, AppConfig.for_rank); unchanged when the two ranks agree."""
    if node.generator.lora_r == run.generator.lora_r:
        return state
    return to_client_rank(
        state, rank=node.generator.lora_r, alpha=node.generator.lora_alpha, method=rank_method(node.fed)
    )


def check_update(state: State, reference: State) -> str | None:
    """Why an update cannot be used (keys, shapes, non-finite values), or None if it can."""
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or unexpected:
        return f"keys differ: missing {missing[:2]}, unexpected {unexpected[:2]}"
    for key, ref in reference.items():
        if state[key].shape != ref.shape:
            return f"'{key}' has shape {state[key].shape}, expected {ref.shape}"
        if not np.isfinite(state[key]).all():
            return f"'{key}' holds NaN or Inf"
    return None


def check_update_at_rank(state: State, rank: int, reference: State) -> str | None:
    """Why a reply of LoRA rank <= ``rank`` cannot be used (checked as its rank-``rank`` padding, same ΔW), or
    None."""
    try:
        return check_update(to_global_rank(state, rank=rank), reference)
    except (ValueError, AssertionError) as e:
        return str(e)


def check_frozen_a(theirs: float | None, ours: float) -> str | None:
    """FFA-LoRA: why a reply's frozen A (its rag.generator.lora_a_fingerprint) is not the server's, or None."""
    if theirs is None or abs(float(theirs) - ours) > 1e-6 * max(1.0, abs(ours)):
        return (
            f"its frozen LoRA A (fingerprint {theirs}) is not the server's ({ours}): "
            "FFA-LoRA needs the same generator, LoRA config and runtime.seed on every node"
        )
    return None


def to_wire_update(reply: State, sent: State, dtype: str) -> State:
    """The reply with each retriever array replaced by its update (reply − sent, in fp32) cast to ``dtype``; same
    keys, same order. LoRA arrays pass unchanged."""
    out: State = {}
    for key, array in reply.items():
        if key.startswith(RETRIEVER):
            update = array.astype(np.float32) - sent[key].astype(np.float32)
            array = np.ascontiguousarray(update.astype(np.dtype(dtype)))
        out[key] = array
    return out


def from_wire_update(reply: State, sent: State) -> State:
    """fp32 weights from a reply of ``to_wire_update``: the sent global plus each retriever update (ValueError on a
    shape that does not fit, KeyError on a key never sent)."""
    out: State = {}
    for key, array in reply.items():
        if key.startswith(RETRIEVER):
            base = sent[key]
            if array.shape != base.shape:
                raise ValueError(f"'{key}' has shape {array.shape}, expected {base.shape}")
            array = np.ascontiguousarray(base.astype(np.float32) + array.astype(np.float32))
        out[key] = array
    return out
