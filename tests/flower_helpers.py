"""Plain helpers for the tests of the Flower edge without a runtime (tests/test_flower_app.py, test_privacy.py,
test_heterogeneous_ranks.py, test_server_optimizers.py): hand-built Messages and Contexts (their Metadata
too: outside a Flower runtime a Message has no run id to take), the ServerApp's strategy as main() builds it, one
train message through the real ClientApp. The fixtures they use (`node`, `in_a_server_app`) are in tests/conftest.py.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict

from fedrag_app.config.app_config import AppConfig
from fedrag_app.federation.exchange import flat_state, outgoing_state
from fedrag_app.flower import client_app
from fedrag_app.flower.records import numpy_to_record
from fedrag_app.flower.strategies import build_strategy
from fedrag_app.rag.generator import lora_state_dict

TINY = {
    "runtime.num-threads": 0,
    "train.mode": "ra-dit",
    "train.max-steps": 1,
    "train.num-examples": 4,
    "ralt.batch-size": 2,
    "ralt.top-k": 1,
    "ralt.max-seq-len": 128,
    "lsr.batch-size": 2,
    "lsr.top-k": 2,
    "lsr.max-seq-len": 128,
    "eval.top-k": 1,
    "eval.recall-k": 5,
}


def message(content: RecordDict, message_type: str, *, src: int = 0, dst: int = 7) -> Message:
    md = Metadata(
        run_id=1,
        message_id=f"m{src}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type=message_type,
    )
    return Message(content=content, metadata=md)


def reply(content: RecordDict | Error, src: int, *, message_type: str = "train") -> Message:
    md = Metadata(
        run_id=1,
        message_id=f"r{src}",
        src_node_id=src,
        dst_node_id=0,
        reply_to_message_id="m0",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type=message_type,
    )
    if isinstance(content, Error):
        return Message(error=content, metadata=md)
    return Message(content=content, metadata=md)


def context(node_config: dict, run_config: dict, run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


RALT = {**TINY, "train.mode": "ralt"}


def checked(reference: dict, run: dict | None = None, a_fingerprint: float | None = None):
    """The ServerApp's strategy as main() builds it, for a run config."""
    return build_strategy(AppConfig.from_flat(run or {}), reference, a_fingerprint)


def global_weights(cfg: AppConfig):
    gen, retriever = client_app._models(cfg)
    return numpy_to_record(flat_state(lora_state_dict(gen), retriever.trainable_state_dict()))


class Nodes:
    """What FedAvg's configure_train asks of a Grid: the connected node ids."""

    def __init__(self, n: int):
        self.ids = list(range(1, n + 1))

    def get_node_ids(self):
        return self.ids


def client_round(
    run: dict, node_config: dict, clipping_norm: float | None = None, run_id: int = 1, server_round: int = 1
):
    """One train message through the ClientApp (its mods included), as the server's strategy would send it."""
    cfg = AppConfig.from_flat(run)
    gen, retriever = client_app._models(cfg)
    sent = numpy_to_record(outgoing_state(cfg, gen, retriever))
    config = {"server-round": server_round}
    if clipping_norm is not None:
        config["clipping_norm"] = clipping_norm
    out = client_app.app(
        message(RecordDict({"arrays": sent, "config": ConfigRecord(config)}), "train"),
        context(node_config, run, run_id),
    )
    assert not out.has_error(), out.error
    return sent, out


def peft_key(record_key: str) -> str:
    """lora.<peft state key> -> the key save_pretrained writes (adapter name dropped)."""
    return record_key[len("lora.") :].replace(".default.", ".")


def rdp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Google's dp-accounting directly: `rounds` Gaussian releases of this noise multiplier, epsilon at delta."""
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier), rounds)
    return accountant.get_epsilon(delta)
