"""The server's strategies, built from the run config by build_strategy: Flower's FedAvg, one of its server
optimizers or one of its robust strategies (fed.strategy), or FedAvg with LoRA product averaging
(fed.lora-aggregation = product); inside Flower's DP wrapper when dp.mode is central; always behind CheckedStrategy
(checked_strategy.py), which keeps bad replies out and applies fed.update-norm-bound.

Server optimizers: FedAvg of a few local AdamW steps moves the adapter about a third as far as centralized training
on the same questions (each node walks a third of the steps; the average does not add them). A server optimizer
treats the average update as a pseudo-gradient and takes its own step with a learning rate, momentum or Adam-style
moments. Flower's classes do the maths; the mixin below only (1) counts rounds from the federation's start, so a
resumed FedAdam's bias correction continues, (2) returns each array in the dtype the server sent (float32: the
global weights are always fp32, wire-dtype updates are rebuilt to fp32 before aggregation, and Flower's FedAdam
returns float64), and (3) reads and restores the momentum / moments, which the ServerApp saves in every checkpoint
(checkpoint.SERVER_STATE).

Robust strategies (docs/ROBUSTNESS.md): Flower's FedMedian, FedTrimmedAvg, Krum and MultiKrum, unchanged but for the
precision they work in (RobustAggregator).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, RdpAccountant, SamplingMethod
from flwr.serverapp import PrivacyConfig as DpAccounting
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedrag_app.config.app_config import AppConfig, FedConfig
from fedrag_app.config.checks import ROBUST_STRATEGIES, server_learning_rate
from fedrag_app.core.errors import CheckpointError
from fedrag_app.federation.exchange import exchanged_parts, rank_method
from fedrag_app.federation.lora_aggregation import product_average
from fedrag_app.flower.checked_strategy import CheckedStrategy
from fedrag_app.flower.records import numpy_to_record, record_to_numpy


class KeepsDtypes:
    """Remembers the dtype of each array the server sends in a round, so the aggregate goes back in it."""

    _dtypes: dict[str, np.dtype] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)


class ServerOptimizer(KeepsDtypes):
    """Mixed in before one of Flower's server-optimizer strategies (see the module docstring)."""

    name = ""
    round_offset = 0  # rounds done before this run (fed.resume)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round + self.round_offset, replies)
        if arrays is None:
            return arrays, metrics
        return _in_dtypes(arrays, self._dtypes), metrics

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The momentum (FedAvgM) or first and second moments (FedOpt), keyed '<strategy>/<part>/<array key>';
        {} before the first aggregation."""
        if isinstance(self, FedAvgM):
            if self.momentum_vector is None:
                return {}
            return {f"{self.name}/momentum/{k}": v for k, v in zip(self.current_arrays.keys(), self.momentum_vector)}
        return {
            f"{self.name}/{part}/{k}": v
            for part, moments in (("m", self.m_t), ("v", self.v_t))
            for k, v in (moments or {}).items()
        }

    def restore_optimizer_state(self, state: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> bool:
        """Continue from a checkpoint's state; False (nothing restored) when it belongs to another strategy or is
        empty. ``reference`` is what the server sends, in the order Flower's FedAvgM keeps its momentum."""
        parts = ("momentum",) if isinstance(self, FedAvgM) else ("m", "v")
        expected = {f"{self.name}/{p}/{k}" for p in parts for k in reference}
        if not state or set(state) != expected:
            return False
        for key, value in state.items():
            ref = reference[key.split("/", 2)[2]]
            if value.shape != ref.shape:
                raise CheckpointError(f"server optimizer state '{key}' has shape {value.shape}, the model {ref.shape}")
        if isinstance(self, FedAvgM):
            self.momentum_vector = [state[f"{self.name}/momentum/{k}"] for k in reference]
        else:
            self.m_t = {k: state[f"{self.name}/m/{k}"] for k in reference}
            self.v_t = {k: state[f"{self.name}/v/{k}"] for k in reference}
        return True


class ServerFedAvgM(ServerOptimizer, FedAvgM):
    name = "fedavgm"


class ServerFedAdam(ServerOptimizer, FedAdam):
    name = "fedadam"


class ServerFedYogi(ServerOptimizer, FedYogi):
    name = "fedyogi"


class ServerFedAdagrad(ServerOptimizer, FedAdagrad):
    name = "fedadagrad"


class RobustAggregator(KeepsDtypes):
    """Mixed in before one of Flower's robust strategies: it aggregates the replies in float64 and returns each array
    in the dtype the server sent. Krum scores nodes by |x|^2 + |y|^2 - 2 x.y over whole weight vectors; in float32
    that difference of large numbers drowns updates that are small next to the weights (a LoRA or retriever step
    moves a weight by ~1e-4), and the ranking of nodes would be rounding noise."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for m in replies:
            if not m.has_error() and self.arrayrecord_key in m.content:
                state = record_to_numpy(m.content[self.arrayrecord_key])
                m.content[self.arrayrecord_key] = numpy_to_record({k: v.astype(np.float64) for k, v in state.items()})
        arrays, metrics = super().aggregate_train(server_round, replies)
        return (None if arrays is None else _in_dtypes(arrays, self._dtypes)), metrics


class RobustFedMedian(RobustAggregator, FedMedian):
    """The coordinate-wise median of the replies (unweighted)."""


class RobustFedTrimmedAvg(RobustAggregator, FedTrimmedAvg):
    """The coordinate-wise mean after cutting int(beta x n) replies from each tail (unweighted)."""


class RobustKrum(RobustAggregator, Krum):
    """The one reply closest to its n - f - 2 nearest others."""


class RobustMultiKrum(RobustAggregator, MultiKrum):
    """The weighted mean of the m replies Krum scores best."""


def _in_dtypes(arrays: ArrayRecord, dtypes: dict[str, np.dtype]) -> ArrayRecord:
    """The aggregate with each array in the dtype the server sent (Flower's maths may return float64)."""
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(a.numpy().astype(dtypes.get(k, a.numpy().dtype)))) for k, a in arrays.items()}
    )


def robust_strategy(cfg: FedConfig, **kwargs) -> FedAvg:
    """The robust strategy fed.strategy names, with its fed.trim-beta / fed.krum-malicious-nodes /
    fed.multikrum-select (config.checks.check_robust_options has checked them against fed.min-nodes)."""
    f = cfg.krum_malicious_nodes
    if cfg.strategy == "fedmedian":
        return RobustFedMedian(**kwargs)
    if cfg.strategy == "fedtrimmedavg":
        return RobustFedTrimmedAvg(beta=cfg.trim_beta, **kwargs)
    if cfg.strategy == "krum":
        return RobustKrum(num_malicious_nodes=f, **kwargs)
    return RobustMultiKrum(
        num_malicious_nodes=f, num_nodes_to_select=cfg.multikrum_select or cfg.min_nodes - f, **kwargs
    )


def server_strategy(cfg: FedConfig, *, round_offset: int = 0, **kwargs) -> FedAvg:
    """Flower's FedAvg, a robust strategy, or the server optimizer fed.strategy names with its fed.server-*
    hyperparameters."""
    lr = server_learning_rate(cfg)
    if cfg.strategy == "fedavg":
        return FedAvg(**kwargs)
    if cfg.strategy in ROBUST_STRATEGIES:
        return robust_strategy(cfg, **kwargs)
    if cfg.strategy == "fedavgm":
        strategy: ServerOptimizer = ServerFedAvgM(
            server_learning_rate=lr, server_momentum=cfg.server_momentum, **kwargs
        )
    elif cfg.strategy == "fedadagrad":
        strategy = ServerFedAdagrad(eta=lr, tau=cfg.server_tau, **kwargs)
    else:
        cls = ServerFedAdam if cfg.strategy == "fedadam" else ServerFedYogi
        strategy = cls(eta=lr, beta_1=cfg.server_beta_1, beta_2=cfg.server_beta_2, tau=cfg.server_tau, **kwargs)
    strategy.round_offset = round_offset
    return strategy


class LoraProductFedAvg(FedAvg):
    """FedAvg whose LoRA factors are aggregated as the weighted mean of B·A per layer, refactored to rank r by
    truncated SVD (lora_aggregation.product_average); the retriever is averaged as in FedAvg."""

    def __init__(self, *, rank: int, alpha: float, **kwargs):
        super().__init__(**kwargs)
        self.rank, self.alpha, self.last_aggregation_metrics = rank, alpha, {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        states = [record_to_numpy(c["arrays"]) for c in contents]
        weights = [float(c["metrics"][self.weighted_by_key]) for c in contents]
        state, lost = product_average(states, weights, rank=self.rank, alpha=self.alpha)
        self.last_aggregation_metrics = {f"lora-{k}": v for k, v in lost.items()}
        dtypes = {k: v.dtype for k, v in states[0].items()}
        merged = numpy_to_record({k: state[k].astype(dtypes[k]) for k in states[0]})  # the replies' key order
        return merged, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def build_strategy(
    cfg: AppConfig, reference: dict, a_fingerprint: float | None, *, rounds_done: int = 0
) -> CheckedStrategy:
    """The aggregator (FedAvg, a server optimizer, a robust strategy or LoRA product averaging), wrapped in Flower's
    DP strategy when dp.mode is central, then checked (CheckedStrategy), which also bounds update norms
    (fed.update-norm-bound).

    Under central DP every node weighs the same ('dp-weight' = 1: the noise is calibrated to C / nodes) and each
    round samples exactly fed.min-nodes nodes (the fixed sample size Flower's accountant requires). A resumed run
    charges the accountant for every round already done (the same release each round; at worst an over-count)."""
    m, central = cfg.fed.min_nodes, cfg.dp.central
    kwargs = dict(
        fraction_train=1e-9 if central else cfg.fed.fraction_train,  # max(int(n * 1e-9), m) = m nodes
        fraction_evaluate=cfg.fed.fraction_evaluate,
        min_train_nodes=m,
        min_evaluate_nodes=m,
        min_available_nodes=m,
        weighted_by_key="dp-weight" if cfg.dp.mode != "off" else "num-examples",  # DP: counts are private
    )
    if cfg.fed.lora_aggregation == "product":
        aggregator: FedAvg = LoraProductFedAvg(rank=cfg.generator.lora_r, alpha=cfg.generator.lora_alpha, **kwargs)
    else:  # FedAvg, or the strategy fed.strategy names (config.checks refuses it with product / central DP)
        aggregator = server_strategy(cfg.fed, round_offset=rounds_done, **kwargs)
    inner: Strategy = aggregator
    if central:
        accountant = None
        if cfg.dp.noise_multiplier > 0:
            accountant = RdpAccountant(
                DpAccounting(
                    target_delta=cfg.dp.delta,
                    population_size=m,
                    neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=SamplingMethod.NO_AMPLIFICATION,
                )
            )
            if rounds_done:
                accountant.compose(GaussianPrivacyEvent(cfg.dp.noise_multiplier, m, m), count=rounds_done)
        wrapper = (
            DifferentialPrivacyClientSideFixedClipping
            if cfg.dp.mode == "client-clip"
            else DifferentialPrivacyServerSideFixedClipping
        )
        inner = wrapper(aggregator, cfg.dp.noise_multiplier, cfg.dp.clipping_norm, m, accountant=accountant)
    pads = cfg.fed.lora_aggregation != "ffa" and cfg.dp.mode == "off" and exchanged_parts(cfg.train)[0]
    return CheckedStrategy(
        inner,
        aggregator,
        reference,
        a_fingerprint=a_fingerprint if cfg.fed.lora_aggregation == "ffa" else None,
        global_rank=cfg.generator.lora_r if pads else None,
        lora_alpha=cfg.generator.lora_alpha,
        rank_method=rank_method(cfg.fed),
        wire_updates=cfg.retriever.wire_dtype != "float32" and exchanged_parts(cfg.train)[1],
        update_norm_bound=cfg.fed.update_norm_bound,
    )
