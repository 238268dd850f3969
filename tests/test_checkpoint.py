"""Per-round checkpoints: loadable by PEFT and sentence-transformers, atomic, and the right one is resumed."""

from __future__ import annotations

import json

import pytest
import torch

from fedrag_app.core.errors import CheckpointError
from fedrag_app.federation.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fedrag_app.rag.generator import load_lora_state_dict, lora_state_dict


def test_save_then_resume_restores_both_models(tmp_path, generator, retriever):
    lora0, retr0 = lora_state_dict(generator), retriever.trainable_state_dict()
    try:
        save_checkpoint(tmp_path, 1, generator, retriever, {"wq-f1": 0.1}, {"fed.num-server-rounds": 3})
        bumped = {k: v + 0.5 for k, v in lora0.items()}
        load_lora_state_dict(generator, bumped)
        retriever.load_trainable_state_dict({k: v * 2 for k, v in retr0.items()})
        save_checkpoint(tmp_path, 2, generator, retriever, {"wq-f1": 0.2}, {})
        (tmp_path / "round-0003.tmp").mkdir()  # a crash mid-save: ignored
        (tmp_path / "round-0004").mkdir()  # no state.json: ignored
        (tmp_path / "round-0004" / "state.json").write_text(json.dumps({"round": 4, "complete": False}))

        load_lora_state_dict(generator, lora0)
        retriever.load_trainable_state_dict(retr0)
        ckpt = latest_checkpoint(tmp_path)
        assert ckpt.round == 2 and (ckpt.adapter_dir / "adapter_config.json").exists()
        assert (ckpt.retriever_dir / "query" / "config_sentence_transformers.json").exists()
        load_checkpoint(ckpt, generator, retriever)
        assert all(torch.allclose(lora_state_dict(generator)[k], bumped[k]) for k in bumped)
        assert all(torch.allclose(retriever.trainable_state_dict()[k], retr0[k] * 2) for k in retr0)
    finally:
        load_lora_state_dict(generator, lora0)
        retriever.load_trainable_state_dict(retr0)


def test_the_server_resumes_from_the_last_checkpoint_only_under_fed_resume(tmp_path, generator, retriever):
    """flower/server_training.py: resume loads the last complete round; the strategy's server optimizer is built
    for a resumed run too (its state restarts when the checkpoint holds none)."""
    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.federation.exchange import outgoing_state
    from fedrag_app.flower.records import numpy_to_record
    from fedrag_app.flower.server_training import resume, strategy_for

    lora0 = lora_state_dict(generator)
    try:
        save_checkpoint(tmp_path, 2, generator, retriever, {}, {})
        cfg = AppConfig.from_flat({"fed.resume": True, "fed.strategy": "fedavgm"})
        assert resume(AppConfig.from_flat({"fed.strategy": "fedavgm"}), tmp_path, generator, retriever) is None
        assert resume(cfg, tmp_path / "empty", generator, retriever) is None
        ckpt = resume(cfg, tmp_path, generator, retriever)
        assert ckpt.round == 2
        initial = numpy_to_record(outgoing_state(cfg, generator, retriever))
        strategy, optimizer = strategy_for(cfg, generator, initial, ckpt)
        assert optimizer is not None and strategy.aggregator is optimizer
        assert strategy_for(AppConfig.from_flat({}), generator, initial, None)[1] is None, "plain FedAvg"
    finally:
        load_lora_state_dict(generator, lora0)


def test_no_checkpoint_and_unreadable_state(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "round-0001").mkdir()
    (tmp_path / "round-0001" / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="round-0001/state.json"):
        latest_checkpoint(tmp_path)
