"""LoRA-aware aggregation: averaging what the adapters stand for, not their factors.

Plain FedAvg of LoRA factors is not the average of the updates: mean(B)·mean(A) != mean(B·A). Three fixes,
all tensor-only (numpy, no Flower), each exact where the maths allows and reporting its error where not:

- FFA-LoRA: A stays frozen at its shared initialisation and only B trains, so mean(B_i)·A = mean(B_i·A) exactly.
- Product averaging: form ΔW = Σ w_i s_i B_i A_i per layer, refactor to rank r by truncated SVD, report the
  energy lost (0 when the rank allows it).
- Heterogeneous ranks: clients train ranks r_i ≤ R from ``to_client_rank`` (the global adapter cut to r_i, which
  loses what lies beyond r_i). Averaging whole replies would average that loss into the global adapter every round,
  so ``rank_update_average`` averages updates instead: ΔW_global + Σ w_i (ΔW(reply_i) − ΔW(sent_i)), refactored to R.

Keys follow PEFT: '<module>.lora_A.weight' (r, in) and '<module>.lora_B.weight' (out, r); ΔW = (alpha / r) B A.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class LoraPair:
    a_key: str
    b_key: str


def lora_pairs(state: State) -> dict[str, LoraPair]:
    """Module name -> its (A, B) keys; every A must have its B."""
    pairs: dict[str, LoraPair] = {}
    for key in state:
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            b_key = key.replace(".lora_A.", ".lora_B.")
            assert b_key in state, f"LoRA key {key} has no matching {b_key}"
            pairs[module] = LoraPair(key, b_key)
    return pairs


def _normalised(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    assert (w >= 0).all() and w.sum() > 0, f"aggregation weights must be >= 0 with a positive sum, got {weights}"
    return w / w.sum()


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """FedAvg on every key (the baseline; exact for FFA-LoRA, where A is identical across clients)."""
    w = _normalised(weights)
    return {k: sum(wi * s[k].astype(np.float64) for wi, s in zip(w, states)).astype(np.float32) for k in states[0]}


def delta_w(states: list[State], weights: list[float], scales: list[float], module: str, pair: LoraPair) -> np.ndarray:
    """Σ_i w_i s_i B_i A_i for one module, exactly (shapes (out, r_i) @ (r_i, in) -> (out, in))."""
    w = _normalised(weights)
    return sum(
        wi * si * (s[pair.b_key].astype(np.float64) @ s[pair.a_key].astype(np.float64))
        for wi, si, s in zip(w, scales, states)
    )


DEAD_ROW_NORM = 3**-0.5  # the row norm of PEFT's kaiming-uniform A init: rows for directions ΔW does not use


def refactor(dw: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Truncated SVD: B (out, r), A (r, in) with scale·B·A ≈ ΔW; returns the share of energy lost.

    A direction with a zero singular value gets B = 0 and an A row of init size along its singular vector, not
    A = 0: with both factors zero the direction could never train again (round 1, where ΔW = 0, would kill all)."""
    u, s, vt = np.linalg.svd(dw, full_matrices=False)  # (out, m), (m,), (m, in)
    root = np.sqrt(s[:rank] / scale)
    b = u[:, :rank] * root  # (out, r)
    unused = s[:rank] <= 1e-12 * max(float(s[0]) if s.size else 0.0, 1e-30)
    a_root = np.where(unused, DEAD_ROW_NORM, root)
    a = a_root[:, None] * vt[:rank]  # (r, in)
    if b.shape[1] < rank:  # the layer has fewer dimensions than the rank: pad with zeros
        b = np.pad(b, ((0, 0), (0, rank - b.shape[1])))
        a = np.pad(a, ((0, rank - a.shape[0]), (0, 0)))
    total = float((s**2).sum())
    lost = float((s[rank:] ** 2).sum()) / total if total > 0 else 0.0
    return b.astype(np.float32), a.astype(np.float32), lost


def adapter_rank(state: State) -> int:
    """The rank r of an adapter: the rows of its A factors."""
    pair = next(iter(lora_pairs(state).values()))
    return int(state[pair.a_key].shape[0])


def product_average(
    states: list[State], weights: list[float], *, rank: int, alpha: float
) -> tuple[State, dict[str, float]]:
    """Exact weighted mean of ΔW per module, refactored to ``rank``; other keys are plain-averaged.

    Each client's scale is alpha / r_i with r_i read from its factors, so clients of different ranks mix correctly.
    Returns the new state and {'svd-energy-lost-max': …, 'svd-energy-lost-mean': …}.
    """
    scales = [alpha / adapter_rank(s) for s in states]
    pairs = lora_pairs(states[0])
    lora_keys = {k for p in pairs.values() for k in (p.a_key, p.b_key)}
    others = [{k: v for k, v in s.items() if k not in lora_keys} for s in states]
    out = weighted_mean(others, weights) if others[0] else {}
    losses = []
    for module, pair in pairs.items():
        b, a, lost = refactor(delta_w(states, weights, scales, module, pair), rank, alpha / rank)
        out[pair.b_key], out[pair.a_key] = b, a
        losses.append(lost)
    return out, {
        "svd-energy-lost-max": max(losses, default=0.0),
        "svd-energy-lost-mean": float(np.mean(losses or [0.0])),
    }


def to_global_rank(state: State, *, rank: int) -> State:
    """A rank-r_i reply as a rank-``rank`` adapter with the global scale alpha / rank and the same ΔW: B rescaled by
    rank / r_i, both factors zero-padded (the server checks replies in this form; it aggregates them with
    ``rank_update_average``)."""
    out = dict(state)
    for pair in lora_pairs(state).values():
        a, b = state[pair.a_key], state[pair.b_key]
        r_i = a.shape[0]
        if r_i > rank or b.shape[1] != r_i:
            raise ValueError(
                f"'{pair.a_key}' has rank {r_i} and its B {b.shape[1]}: a reply's rank must be at most "
                f"the global generator.lora-r = {rank}, the same in A and B"
            )
        if r_i < rank:
            out[pair.a_key] = np.pad(a, ((0, rank - r_i), (0, 0)))
            out[pair.b_key] = np.pad(b * np.float32(rank / r_i), ((0, 0), (0, rank - r_i))).astype(b.dtype)
    return out


def _scaled_product(state: State, pair: LoraPair, alpha: float) -> np.ndarray:
    """ΔW = (alpha / r) B A of one module in float64, r read from the factors."""
    a, b = state[pair.a_key].astype(np.float64), state[pair.b_key].astype(np.float64)
    return (alpha / a.shape[0]) * (b @ a)


def rank_update_average(
    global_state: State, replies: list[State], weights: list[float], *, alpha: float, method: str
) -> tuple[State, dict[str, float]]:
    """Heterogeneous ranks: the new global LoRA factors (rank R of ``global_state``), ΔW_global + Σ w_i (ΔW(reply_i)
    − ΔW(sent_i)) per module, where sent_i = to_client_rank(global, r_i, method) is what node i started from.

    A node that did not train changes nothing, whatever its rank; the sum is exact and only the refactoring to R
    may lose energy (reported as for ``product_average``). A module nobody changed keeps its factors (round 1's
    shared random A included). Returns the LoRA keys only."""
    rank, w = adapter_rank(global_state), _normalised(weights)
    sent = {
        r: to_client_rank(global_state, rank=r, alpha=alpha, method=method) for r in {adapter_rank(s) for s in replies}
    }
    out: State = {}
    losses = []
    for pair in lora_pairs(global_state).values():
        change = sum(
            wi * (_scaled_product(s, pair, alpha) - _scaled_product(sent[adapter_rank(s)], pair, alpha))
            for wi, s in zip(w, replies)
        )
        if not np.any(change):
            out[pair.b_key], out[pair.a_key] = global_state[pair.b_key], global_state[pair.a_key]
            losses.append(0.0)
            continue
        out[pair.b_key], out[pair.a_key], lost = refactor(
            _scaled_product(global_state, pair, alpha) + change, rank, alpha / rank
        )
        losses.append(lost)
    return out, {
        "svd-energy-lost-max": max(losses, default=0.0),
        "svd-energy-lost-mean": float(np.mean(losses or [0.0])),
    }


def to_client_rank(global_state: State, *, rank: int, alpha: float, method: str) -> State:
    """The global adapter (rank R, scale alpha / R) for a rank-``rank`` client (scale alpha / rank).

    'truncate' (fed.lora-aggregation = fedavg): the first ``rank`` components, B rescaled to keep their product;
    'svd' (product): the best rank-``rank`` approximation of the global ΔW. A layer whose ΔW is
    still zero (B = 0: round 1) is truncated under both, keeping the shared random A. Other keys pass unchanged."""
    global_rank = adapter_rank(global_state)
    if rank == global_rank:
        return dict(global_state)
    out = dict(global_state)
    for pair in lora_pairs(global_state).values():
        a, b = global_state[pair.a_key], global_state[pair.b_key]
        if method == "svd" and np.any(b):
            dw = (alpha / global_rank) * (b.astype(np.float64) @ a.astype(np.float64))
            out[pair.b_key], out[pair.a_key], _ = refactor(dw, rank, alpha / rank)
        else:
            out[pair.a_key] = np.ascontiguousarray(a[:rank])
            out[pair.b_key] = np.ascontiguousarray(b[:, :rank] * np.float32(rank / global_rank))
    return out
