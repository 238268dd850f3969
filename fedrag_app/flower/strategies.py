"""Flower's server optimizers as fed.strategy: FedAvgM, FedAdam, FedYogi, FedAdagrad (flwr.serverapp.strategy).

FedAvg of a few local AdamW steps moves the adapter about a third as far as centralized training on the same
questions (each node walks a third of the steps; the average does not add them). A server optimizer treats the
average update as a pseudo-gradient and takes its own step with a learning rate, momentum or Adam-style moments.
Flower's classes do the maths; the mixin below only (1) counts rounds from the federation's start, so a resumed
FedAdam's bias correction continues, (2) keeps the adaptive moments in float32 when a part travels as float16
and returns each array in the dtype the server sent (Flower's FedAdam returns float64), and (3) reads and
restores the momentum / moments, which the ServerApp saves in every checkpoint (checkpoint.SERVER_STATE).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from fedrag_app.config.app_config import FedConfig
from fedrag_app.config.checks import server_learning_rate
from fedrag_app.core.errors import CheckpointError


class ServerOptimizer:
    """Mixed in before one of Flower's server-optimizer strategies (see the module docstring)."""

    name = ""
    round_offset = 0  # rounds done before this run (fed.resume)
    _dtypes: dict[str, np.dtype] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
        messages = super().configure_train(server_round, arrays, config, grid)
        if isinstance(self.current_arrays, dict):  # FedOpt's copy: its moments follow its dtype (fp16 underflows)
            self.current_arrays = {k: v.astype(np.float32) for k, v in self.current_arrays.items()}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round + self.round_offset, replies)
        if arrays is None:
            return arrays, metrics
        state = {k: a.numpy() for k, a in arrays.items()}
        return ArrayRecord(
            {k: Array(np.ascontiguousarray(v.astype(self._dtypes.get(k, v.dtype)))) for k, v in state.items()}
        ), metrics

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


def server_strategy(cfg: FedConfig, *, round_offset: int = 0, **kwargs) -> FedAvg:
    """Flower's FedAvg, or the server optimizer fed.strategy names with its fed.server-* hyperparameters."""
    lr = server_learning_rate(cfg)
    if cfg.strategy == "fedavg":
        return FedAvg(**kwargs)
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
