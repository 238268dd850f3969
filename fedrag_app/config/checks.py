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

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
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
    if rank != cfg.generator.lora_r and cfg.fed.strategy != "fedavg":
        raise ConfigError(
            f"{where} = {rank} with 'fed.strategy' = {cfg.fed.strategy!r}: a round with a lower-rank "
            "reply refactors the global adapter by SVD (a new basis each round), so its factors' change "
            "is no update to keep momentum or moments over; heterogeneous ranks use fed.strategy = "
            "'fedavg'"
        )


def check_strategy_options(cfg: AppConfig) -> None:
    """Refuse by name a server optimizer that cannot be applied soundly with the other options."""
    fed = cfg.fed
    _one_of("fed", "strategy", fed.strategy, STRATEGIES)
    _positive("fed", "server_learning_rate", fed.server_learning_rate, zero_ok=True)
    _positive("fed", "server_tau", fed.server_tau)
    for name in ("server_momentum", "server_beta_1", "server_beta_2"):
        if not 0.0 <= getattr(fed, name) < 1.0:
            raise ConfigError(
                f"run-config key 'fed.{name.replace('_', '-')}' = {getattr(fed, name)!r}: must be in [0, 1)"
            )
    if fed.strategy == "fedavg":
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
