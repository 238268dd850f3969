"""The strategy every server round goes through: Flower's own (FedAvg, a server optimizer or LoRA product averaging,
inside Flower's DP wrapper when DP is on) behind the checks that keep a bad reply out of the average.

A reply whose weights cannot be averaged (unreadable records, NaN/Inf, wrong keys or shapes, under FFA-LoRA a
different frozen A) is logged and dropped; one with weight 0 (the node learned from no question) is left out, not
counted as a failure; a lower-rank reply (heterogeneous ranks) is checked as its padding to the
global rank, and a round with such replies averages the nodes' ΔW updates (lora_aggregation.rank_update_average);
a retriever update in the wire dtype is rebuilt into fp32 weights first. With fed.update-norm-bound, every kept
reply's update is then clipped to that multiple of the round's median update norm (federation/robust.py), whatever
the aggregator. The checks themselves are plain numpy (federation/exchange.py); this module only reads them out of
Flower's messages.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedrag_app.config.app_config import PrivacyConfig
from fedrag_app.federation.disclosure import UNPROTECTED, unprotected_means
from fedrag_app.federation.exchange import check_frozen_a, check_update, check_update_at_rank
from fedrag_app.federation.gaussian_dp import composed_epsilon, local_dp_sigma
from fedrag_app.federation.lora_aggregation import adapter_rank, rank_update_average
from fedrag_app.federation.robust import bound_update_norms
from fedrag_app.flower.records import A_FINGERPRINT, CHECKS, from_wire_update, numpy_to_record, record_to_numpy
from fedrag_app.training.lsr import pooled_shares


class CheckedStrategy(Strategy):
    """Wraps the aggregator (FedAvg, a server optimizer or LoRA product averaging; inside Flower's DP wrapper when DP
    is on).

    Drops, with a logged reason, the replies whose weights cannot be averaged (unreadable records, NaN/Inf, wrong
    keys or shapes, under FFA-LoRA a different frozen A) before the inner strategy sees them; error replies pass
    through so Flower's own checks log and count them. Keeps the round's costs and client metrics for reporting."""

    def __init__(
        self,
        inner: Strategy,
        aggregator: FedAvg,
        reference: dict,
        *,
        a_fingerprint: float | None = None,
        global_rank: int | None = None,
        lora_alpha: float = 16.0,
        rank_method: str = "truncate",
        wire_updates: bool = False,
        update_norm_bound: float = 0.0,
    ):
        super().__init__()
        self.inner = inner  # what every call goes to: the aggregator, or Flower's DP wrapper around it
        self.aggregator = aggregator  # the averaging strategy: FedAvg, a server optimizer, LoraProductFedAvg
        self.reference, self.a_fingerprint = reference, a_fingerprint  # every reply's keys and shapes; FFA's A
        self.global_rank = global_rank  # set: replies may have a lower LoRA rank (heterogeneous ranks)
        self.lora_alpha, self.rank_method = lora_alpha, rank_method  # how nodes cut the global adapter to their rank
        self.wire_updates = wire_updates  # replies carry the retriever's update in the wire dtype, not its weights
        self.update_norm_bound = update_norm_bound  # > 0: updates clipped to this multiple of the round's median norm
        self.sent_global = reference  # the global arrays of the round in progress (configure_train updates it)
        self.last_train_metrics, self.last_evaluate_metrics = {}, {}
        self.round_costs: dict[str, float] = {}
        self.disclosed: dict[str, tuple[list[str], int]] = {}  # phase -> (un-noised row keys, nodes that sent them)
        self._sent_at, self._sent_bytes = 0.0, 0

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.global_rank is not None or self.wire_updates or self.update_norm_bound:
            self.sent_global = record_to_numpy(arrays)  # what the replies are updates of
        self._sent_at, self._sent_bytes = time.perf_counter(), arrays.count_bytes() * len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        passed, empty, bytes_up, replies = [], [], 0.0, list(replies)
        for m in replies:
            size = 0 if m.has_error() else m.content["arrays"].count_bytes() if "arrays" in m.content else 0
            problem = None if m.has_error() else self._problem(m.content)
            bytes_up += 0 if problem else size
            if problem:
                log(
                    WARNING,
                    "dropped the update of node %s in round %s: %s",
                    m.metadata.src_node_id,
                    server_round,
                    problem,
                )
            elif not m.has_error() and _learned_nothing(m.content, self.aggregator.weighted_by_key):
                empty.append(m)  # e.g. lsr.gate kept none of its questions: a sound reply with nothing to average
                log(
                    INFO,
                    "node %s learned from no question in round %s: nothing to average",
                    m.metadata.src_node_id,
                    server_round,
                )
            else:
                passed.append(m)
        kept = [m for m in passed if not m.has_error()]
        rank_losses = self._merge_rank_updates(kept) if self.global_rank is not None else {}
        norm_bound = self._bound_update_norms(kept, server_round) if self.update_norm_bound and kept else {}
        local = [float(m.content["metrics"].get("local-seconds", 0.0)) for m in kept + empty]  # an empty one worked
        handler = [float(m.content["metrics"].get("handler-seconds", 0.0)) for m in kept + empty]
        self.round_costs = {  # what Flower adds on top of the clients' own work, and what crossed the network
            "round-train-seconds": time.perf_counter() - self._sent_at,
            "round-local-seconds-sum": sum(local),
            "round-local-seconds-max": max(local, default=0.0),
            "round-handler-seconds-sum": sum(handler),
            "round-handler-seconds-max": max(handler, default=0.0),
            "round-bytes-down": float(self._sent_bytes),
            "round-bytes-up": bytes_up,
            "round-updates-averaged": float(len(kept)),
            "round-updates-empty": float(len(empty)),
            "round-failures": float(len(replies) - len(kept) - len(empty)),
            **norm_bound,
        }  # error replies and dropped updates
        if self.inner is not self.aggregator:  # Flower's DP noise draws from numpy's global RNG, seeded by runtime.seed
            np.random.seed()  # fresh OS entropy: noise that anyone knowing the seed could subtract protects nothing
        arrays, metrics = self.inner.aggregate_train(server_round, passed)
        self.last_train_metrics = dict(metrics) if metrics else {}
        if not kept and empty:  # every node learned nothing (say, the gate kept none): still report what they saw
            numbers = [{k: v for k, v in m.content["metrics"].items() if isinstance(v, (int, float))} for m in empty]
            self.last_train_metrics = unprotected_means(numbers)  # each node counting once
        if pooled := pooled_shares([dict(m.content["metrics"]) for m in kept + empty]):  # empty nodes asked too
            self.last_train_metrics.update(pooled)
            if metrics is not None:
                metrics = MetricRecord({**dict(metrics), **pooled})
        self._disclose("train", kept + empty)
        if arrays is not None and (extra := getattr(self.aggregator, "last_aggregation_metrics", None)):
            self.round_costs.update(extra)
        if arrays is not None:
            self.round_costs.update(rank_losses)
        return arrays, metrics

    def _merge_rank_updates(self, kept: list[Message]) -> dict[str, float]:
        """A round with a lower-rank reply: the LoRA aggregate is ΔW_global + Σ w_i (ΔW(reply_i) − ΔW(sent_i))
        (lora_aggregation.rank_update_average); every reply's LoRA factors are replaced by it, so the inner strategy
        averages identical factors and handles the other keys and the metrics as usual."""
        states = [record_to_numpy(m.content["arrays"]) for m in kept]
        if not any(adapter_rank(s) < self.global_rank for s in states if any(".lora_A." in k for k in s)):
            return {}
        weights = [float(m.content["metrics"][self.aggregator.weighted_by_key]) for m in kept]
        merged, lost = rank_update_average(
            self.sent_global, states, weights, alpha=self.lora_alpha, method=self.rank_method
        )
        for m, state in zip(kept, states):
            m.content["arrays"] = numpy_to_record({k: merged.get(k, v) for k, v in state.items()})
        return {f"lora-{k}": v for k, v in lost.items()}

    def _bound_update_norms(self, kept: list[Message], server_round: int) -> dict[str, float]:
        """fed.update-norm-bound: each kept reply's update clipped to the multiple of the round's median update norm
        (robust.bound_update_norms), each clipped node logged; the round's norms for the metrics."""
        states = [record_to_numpy(m.content["arrays"]) for m in kept]
        bounded, norms, stats = bound_update_norms(states, self.sent_global, self.update_norm_bound)
        for m, state, new, norm in zip(kept, states, bounded, norms):
            if new is not state:
                log(
                    WARNING,
                    "clipped the update of node %s in round %s from norm %.4g to %.4g (%s x the median %.4g)",
                    m.metadata.src_node_id,
                    server_round,
                    norm,
                    stats["update-norm-bound"],
                    self.update_norm_bound,
                    stats["update-norm-median"],
                )
                m.content["arrays"] = numpy_to_record(new)
        return {f"round-{k}": v for k, v in stats.items()}

    def _problem(self, content) -> str | None:
        problem = _reply_problem(content, self.aggregator.weighted_by_key)  # a weight of 0 passes: an empty update
        if problem is None and self.wire_updates:
            problem = _rebuild_wire_update(content, self.sent_global)
        if problem is None and self.global_rank is not None:
            problem = check_update_at_rank(record_to_numpy(content["arrays"]), self.global_rank, self.reference)
        elif problem is None:
            problem = check_update(record_to_numpy(content["arrays"]), self.reference)
        if problem is None and self.a_fingerprint is not None:
            checks = content.config_records.get(CHECKS)
            problem = check_frozen_a(checks.get(A_FINGERPRINT) if checks else None, self.a_fingerprint)
        return problem

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        self.last_evaluate_metrics = dict(metrics) if metrics else {}
        self._disclose("evaluate", replies)
        return metrics

    def _disclose(self, phase: str, replies: list[Message]) -> None:
        """The values nodes opted to send un-noised under DP (node-config dp-share-metrics, federation/disclosure.py):
        averaged over those nodes into the phase's metrics and named, as the metrics row names them, in
        self.disclosed, so the row, the log and the plot mark them as not DP-protected. A node under DP withholds
        its timings too: the round's node seconds are then those of the nodes that shared them, or absent."""
        contents = [m.content for m in replies if not m.has_error()]
        shared = [dict(c[UNPROTECTED]) for c in contents if UNPROTECTED in c.config_records]
        means = unprotected_means(shared)
        if phase == "train":
            self.last_train_metrics.update(means)
            if contents and not any("local-seconds" in c["metrics"] for c in contents):
                for key in ("local-seconds", "handler-seconds"):
                    values = [float(v[key]) for v in shared if key in v]
                    self.round_costs.pop(f"round-{key}-sum", None)
                    self.round_costs.pop(f"round-{key}-max", None)
                    if values:
                        self.round_costs.update({f"round-{key}-sum": sum(values), f"round-{key}-max": max(values)})
        else:
            self.last_evaluate_metrics.update(means)
        if phase == "train":  # a new round: last round's evaluation disclosed nothing about this one
            self.disclosed = {}
        self.disclosed[phase] = ([("train-" if phase == "train" else "") + k for k in means], len(shared))
        if shared:
            log(
                WARNING,
                "%s: %s node(s) sent values computed on their data un-noised (node-config dp-share-metrics): %s are "
                "not DP-protected",
                phase,
                len(shared),
                ", ".join(means),
            )

    def privacy_metrics(self, rounds_done: int, cfg: PrivacyConfig) -> dict[str, float | bool | str | list[str]]:
        """The metrics row's privacy fields: epsilon spent so far (_epsilon_spent) and, under DP, what is protected:
        dp-protected = true (the weights and everything the server computes from them, its evaluation included, are
        covered by the mechanism), dp-unprotected = the row's keys that nodes sent un-noised by their own opt-in,
        and how many nodes did. Logged every round."""
        spent = self._epsilon_spent(rounds_done, cfg)
        if cfg.mode == "off":
            return spent
        train, evaluate = self.disclosed.get("train", ([], 0)), self.disclosed.get("evaluate", ([], 0))
        unprotected = sorted(train[0] + evaluate[0])
        log(
            INFO,
            "DP (%s): the weights and the server's evaluation are DP-protected (epsilon=%.4g at delta=%g); %s",
            cfg.mode,
            spent.get("dp-epsilon", float("nan")),
            cfg.delta,
            f"NOT DP-protected (opted in by nodes): {', '.join(unprotected)}"
            if unprotected
            else "nodes withheld every other value computed on their data",
        )
        return {
            **spent,
            "dp-mode": cfg.mode,
            "dp-protected": True,
            "dp-unprotected": unprotected,
            "dp-unprotected-nodes-train": train[1],
            "dp-unprotected-nodes-evaluate": evaluate[1],
        }

    def _epsilon_spent(self, rounds_done: int, cfg: PrivacyConfig) -> dict[str, float]:
        """epsilon spent so far: Flower's RDP accountant in the central modes; in local mode each node's rounds
        composed exactly (gaussian_dp.composed_epsilon: its noise multiplier sigma / 2C, one release per round done),
        at dp.delta; nothing when DP is off."""
        spent = self.inner.privacy_spent() if hasattr(self.inner, "privacy_spent") else None
        if spent is not None:
            return {
                "dp-epsilon": float(spent.epsilon),
                "dp-delta": float(spent.delta),
                "dp-releases": spent.num_releases,
            }
        if cfg.mode == "local":
            z = local_dp_sigma(cfg.clipping_norm, cfg.local_epsilon, cfg.delta) / (2 * cfg.clipping_norm)
            return {
                "dp-epsilon": composed_epsilon(z, rounds_done, cfg.delta),
                "dp-delta": cfg.delta,
                "dp-releases": rounds_done,
                "dp-noise-multiplier": z,
            }
        return {}


def _rebuild_wire_update(content, sent: dict) -> str | None:
    """Replace a reply's wire-dtype retriever update by fp32 weights (what was sent + the update); why not, or None."""
    try:
        content["arrays"] = from_wire_update(content["arrays"], sent)
    except (KeyError, ValueError) as e:
        return f"its retriever update cannot be rebuilt: {e}"
    return None


def _learned_nothing(content, weight_key: str) -> bool:
    """A sound reply whose weight is 0: the node trained on no question (lsr.gate may keep none of a round's)."""
    return content["metrics"].get(weight_key) == 0


def _reply_problem(content, weight_key: str) -> str | None:
    """Why a reply's records cannot be read (not the numbers in them), or None."""
    if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"}:
        return f"expected one ArrayRecord 'arrays' and one MetricRecord 'metrics', got {sorted(content.keys())}"
    weight = content["metrics"].get(weight_key)
    if not isinstance(weight, (int, float)) or weight < 0 or not np.isfinite(weight):
        return f"metric '{weight_key}' = {weight!r}: expected a number >= 0 (0: the node learned from no question)"
    return None
