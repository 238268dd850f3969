"""Which federation options combine (DP, LoRA aggregation, heterogeneous ranks, server optimizers, a query run's
depth), checked once in AppConfig.__post_init__ and, for a node's own LoRA rank, in AppConfig.node_rank
(docs/FEDERATION.md, section 6; docs/PRIVACY.md). No Flower here: the strategies themselves are built in strategies.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedrag_app.config.values import _one_of, _positive
from fedrag_app.core.errors import ConfigError

if TYPE_CHECKING:
    from fedrag_app.config.app_config import AppConfig, FedConfig

SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum")  # docs/ROBUSTNESS.md
STRATEGIES = ("fedavg", *SERVER_OPTIMIZERS, *ROBUST_STRATEGIES)
DEFAULT_LEARNING_RATE = {"fedavgm": 1.0, "fedadam": 1e-3, "fedyogi": 1e-3, "fedadagrad": 1e-3}


def server_learning_rate(fed: FedConfig) -> float:
    """fed.server-learning-rate, or the strategy's own when it is 0: 1.0 for FedAvgM (FedAvg's step), 1e-3 for the
    adaptive ones, whose step is about how far one weight moves per round (a LoRA weight moves ~1e-4 per local step)."""
    return fed.server_learning_rate or DEFAULT_LEARNING_RATE.get(fed.strategy, 0.0)


def check_federation_options(cfg: AppConfig) -> None:
    """Refuse by name the option combinations the server cannot aggregate soundly."""
    if cfg.dp.central and cfg.fed.lora_aggregation == "product":
        raise ConfigError(
            "run-config keys 'dp.mode' = 'client-clip'/'server-clip' and 'fed.lora-aggregation' = "
            "'product' do not combine: the DP accountant covers FedAvg's aggregation only "
            "(use fed.lora-aggregation = 'ffa' or 'fedavg')"
        )
    for rank in sorted(set(cfg.fed.ranks)):
        check_rank_options(cfg, "run-config key 'fed.client-ranks'", rank)
    check_strategy_options(cfg)
    check_query_depth(cfg)


def check_query_depth(cfg: AppConfig) -> None:
    """A query run merges the nodes' lists to depth max(eval.top-k, eval.recall-k): with fewer passages per node the
    score merge is no longer the top-k of one index over the union, and recall@k counts fewer than k passages."""
    depth = max(cfg.eval.top_k, cfg.eval.recall_k)
    if cfg.fed.task == "query" and cfg.query.top_k_per_node < depth:
        raise ConfigError(
            f"run-config key 'query.top-k-per-node' = {cfg.query.top_k_per_node} is below "
            f"'eval.top-k' = {cfg.eval.top_k} / 'eval.recall-k' = {cfg.eval.recall_k}: each node must send at "
            f"least {depth} passages per question (raise query.top-k-per-node or lower the eval keys)"
        )


def check_rank_options(cfg: AppConfig, where: str, rank: int) -> None:
    """A node's own LoRA rank needs what the server can pad and average: rank <= the global rank, no FFA-LoRA
    (its frozen A is seeded per rank), no DP (Flower's clipping subtracts the sent from the received arrays, which
    then differ in shape), no server optimizer (a round with a lower-rank reply refactors the global adapter by
    SVD, a new basis: its factors' change is no update to keep momentum or moments over)."""
    if not 0 < rank <= cfg.generator.lora_r:
        raise ConfigError(
            f"{where} = {rank}: must be in [1, generator.lora-r = {cfg.generator.lora_r}] (the global adapter's rank)"
        )
    if rank != cfg.generator.lora_r and cfg.fed.lora_aggregation == "ffa":
        raise ConfigError(
            f"{where} = {rank} with fed.lora-aggregation = 'ffa': heterogeneous ranks use 'fedavg' "
            "(zero-padding) or 'product' (stacking)"
        )
    if rank != cfg.generator.lora_r and cfg.dp.mode != "off":
        raise ConfigError(
            f"{where} = {rank} with dp.mode = {cfg.dp.mode!r}: Flower's DP clipping needs every node "
            "to send the global rank"
        )
    if rank != cfg.generator.lora_r and (cfg.fed.strategy in ROBUST_STRATEGIES or cfg.fed.update_norm_bound):
        option = (
            f"'fed.strategy' = {cfg.fed.strategy!r}"
            if cfg.fed.strategy in ROBUST_STRATEGIES
            else f"'fed.update-norm-bound' = {cfg.fed.update_norm_bound!r}"
        )
        raise ConfigError(
            f"{where} = {rank} with {option}: a round with a lower-rank reply replaces every reply's LoRA factors "
            "by the weighted mean of the nodes' ΔW updates before any robust step sees them; heterogeneous ranks "
            "use fed.strategy = 'fedavg' and fed.update-norm-bound = 0"
        )
    if rank != cfg.generator.lora_r and cfg.fed.strategy != "fedavg":
        raise ConfigError(
            f"{where} = {rank} with 'fed.strategy' = {cfg.fed.strategy!r}: a round with a lower-rank "
            "reply refactors the global adapter by SVD (a new basis each round), so its factors' change "
            "is no update to keep momentum or moments over; heterogeneous ranks use fed.strategy = "
            "'fedavg'"
        )


def check_strategy_options(cfg: AppConfig) -> None:
    """Refuse by name a server optimizer or robust strategy that cannot be applied soundly with the other options."""
    fed = cfg.fed
    _one_of("fed", "strategy", fed.strategy, STRATEGIES)
    _positive("fed", "server_learning_rate", fed.server_learning_rate, zero_ok=True)
    _positive("fed", "server_tau", fed.server_tau)
    for name in ("server_momentum", "server_beta_1", "server_beta_2"):
        if not 0.0 <= getattr(fed, name) < 1.0:
            raise ConfigError(
                f"run-config key 'fed.{name.replace('_', '-')}' = {getattr(fed, name)!r}: must be in [0, 1)"
            )
    check_robust_options(cfg)
    if fed.strategy in ROBUST_STRATEGIES and fed.server_learning_rate:
        raise ConfigError(
            f"run-config key 'fed.server-learning-rate' = {fed.server_learning_rate!r} with 'fed.strategy' = "
            f"{fed.strategy!r}: only the server optimizers {SERVER_OPTIMIZERS} take a server step"
        )
    if fed.strategy not in SERVER_OPTIMIZERS:
        if fed.server_learning_rate:
            raise ConfigError(
                f"run-config key 'fed.server-learning-rate' = {fed.server_learning_rate!r} with "
                "'fed.strategy' = 'fedavg': FedAvg has no server learning rate (use 'fedavgm'; with "
                "fed.server-momentum = 0 it is plain server SGD on the average update)"
            )
        return
    if cfg.dp.central:
        raise ConfigError(
            f"run-config keys 'fed.strategy' = {fed.strategy!r} and 'dp.mode' = {cfg.dp.mode!r} do not "
            "combine: Flower's central DP wrapper adds its noise to the server optimizer's output, whose "
            "change under one node is not clipping-norm / nodes (the step is scaled, and the momentum or "
            "moments carry earlier rounds' un-noised averages); use fed.strategy = 'fedavg', or "
            "dp.mode = 'local' (the server then only post-processes noised updates)"
        )
    if fed.lora_aggregation == "product":
        raise ConfigError(
            f"run-config keys 'fed.strategy' = {fed.strategy!r} and 'fed.lora-aggregation' = 'product' "
            "do not combine: product averaging returns the SVD factors of the mean B·A, a new basis "
            "each round, so their difference from last round's factors is no update to accumulate "
            "momentum or moments over; use fed.lora-aggregation = 'fedavg' or 'ffa'"
        )


def check_robust_options(cfg: AppConfig) -> None:
    """Robust aggregation (docs/ROBUSTNESS.md): its parameters, enough nodes per round to outvote one malicious
    node, and no central DP (its noise is calibrated to the mean's sensitivity, clipping-norm / nodes; a median's or
    a data-dependent clip's differs) nor product averaging (its own aggregator of B·A)."""
    fed = cfg.fed
    if not 0.0 <= fed.trim_beta < 0.5:
        raise ConfigError(f"run-config key 'fed.trim-beta' = {fed.trim_beta!r}: must be in [0, 0.5)")
    _positive("fed", "krum_malicious_nodes", fed.krum_malicious_nodes, zero_ok=True)
    _positive("fed", "multikrum_select", fed.multikrum_select, zero_ok=True)
    if fed.update_norm_bound:
        if fed.update_norm_bound < 1.0:
            raise ConfigError(
                f"run-config key 'fed.update-norm-bound' = {fed.update_norm_bound!r}: must be 0 (off) or >= 1 "
                "(a multiple of the round's median update norm; below 1 the median node itself is clipped)"
            )
        if cfg.dp.central:
            raise ConfigError(
                f"run-config keys 'fed.update-norm-bound' = {fed.update_norm_bound!r} and 'dp.mode' = "
                f"{cfg.dp.mode!r} do not combine: the bound follows the other nodes' updates, so one node "
                "changes what the others contribute and the DP noise no longer covers it (dp.clipping-norm "
                "already bounds every update)"
            )
        if fed.min_nodes < 3:
            raise ConfigError(
                f"run-config key 'fed.update-norm-bound' = {fed.update_norm_bound!r} with fed.min-nodes = "
                f"{fed.min_nodes}: the median of two update norms is their mean, which one scaled update sets; "
                "set fed.min-nodes >= 3"
            )
    if fed.strategy not in ROBUST_STRATEGIES:
        return
    if cfg.dp.central:
        raise ConfigError(
            f"run-config keys 'fed.strategy' = {fed.strategy!r} and 'dp.mode' = {cfg.dp.mode!r} do not "
            "combine: Flower's central DP noise is calibrated to the mean's sensitivity (clipping-norm / nodes), "
            "not a robust aggregate's; use fed.strategy = 'fedavg', or dp.mode = 'local'"
        )
    if fed.lora_aggregation == "product":
        raise ConfigError(
            f"run-config keys 'fed.strategy' = {fed.strategy!r} and 'fed.lora-aggregation' = 'product' do not "
            "combine: product averaging is its own aggregator (the mean of B·A, refactored by SVD), while robust "
            "strategies aggregate the factors as they travel; use fed.lora-aggregation = 'ffa' (exact) or 'fedavg'"
        )
    m, f = fed.min_nodes, fed.krum_malicious_nodes
    if fed.strategy == "fedmedian" and m < 3:
        raise ConfigError(
            f"run-config key 'fed.strategy' = 'fedmedian' with fed.min-nodes = {m}: the median of two nodes is "
            "their mean; set fed.min-nodes >= 3"
        )
    if fed.strategy == "fedtrimmedavg" and int(fed.trim_beta * m) < 1:
        raise ConfigError(
            f"run-config key 'fed.strategy' = 'fedtrimmedavg' with fed.trim-beta = {fed.trim_beta} and "
            f"fed.min-nodes = {m}: int(beta x nodes) = 0 cuts no node from either tail (a plain mean); raise "
            "fed.trim-beta or fed.min-nodes"
        )
    if fed.strategy in ("krum", "multikrum") and m < 2 * f + 3:
        raise ConfigError(
            f"run-config key 'fed.strategy' = {fed.strategy!r} with fed.krum-malicious-nodes = {f} needs "
            f"fed.min-nodes >= 2f + 3 = {2 * f + 3} (Krum's guarantee), got {m}"
        )
    if fed.strategy == "multikrum" and fed.multikrum_select > m - f:
        raise ConfigError(
            f"run-config key 'fed.multikrum-select' = {fed.multikrum_select}: must be <= fed.min-nodes - "
            f"fed.krum-malicious-nodes = {m - f} (averaging more would let a malicious update in)"
        )
