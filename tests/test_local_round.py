"""One local round: RA-DIT schedules, and determinism (the federated one-client == centralized proof rests on it)."""

import torch

from fedrag_app.config import AppConfig, TrainConfig
from fedrag_app.data import load_web_questions
from fedrag_app.generator import load_lora_state_dict, lora_state_dict
from fedrag_app.knowledge_store import KnowledgeStore
from fedrag_app.local_round import phases, run_local_round

TINY = {"train.mode": "ra-dit", "train.max-steps": 1, "train.num-examples": 4, "ralt.batch-size": 2,
        "ralt.max-seq-len": 192, "lsr.batch-size": 2, "lsr.top-k": 2, "lsr.max-seq-len": 192}


def test_ra_dit_schedules():
    assert phases(TrainConfig(mode="ralt"), 1) == ["ralt"]
    assert phases(TrainConfig(mode="lsr"), 2) == ["lsr"]
    assert phases(TrainConfig(mode="ra-dit", ra_dit_schedule="joint"), 3) == ["lsr", "ralt"]
    alternate = TrainConfig(mode="ra-dit", ra_dit_schedule="alternate")
    assert [phases(alternate, r) for r in (1, 2, 3)] == [["lsr"], ["ralt"], ["lsr"]]


def test_same_inputs_and_seed_give_identical_weights(generator, retriever, small_shard_path, data_dir):
    cfg = AppConfig.from_flat(TINY)
    examples = load_web_questions("train", cfg.data)[:10]
    lora0, retr0 = lora_state_dict(generator), retriever.trainable_state_dict()
    results = []
    try:
        for _ in range(2):
            load_lora_state_dict(generator, lora0)
            retriever.load_trainable_state_dict(retr0)
            with KnowledgeStore.open(path=small_shard_path) as store:
                result = run_local_round(cfg, generator, retriever, store, examples, server_round=1)
            results.append((result, lora_state_dict(generator), retriever.trainable_state_dict()))
    finally:
        load_lora_state_dict(generator, lora0)
        retriever.load_trainable_state_dict(retr0)
    (r1, lora1, retr1), (r2, lora2, retr2) = results
    assert r1.num_examples == 4 and r1.metrics["lsr-steps"] == 1 and r1.metrics["ralt-steps"] == 1
    assert all(torch.equal(lora1[k], lora2[k]) for k in lora1)
    assert all(torch.equal(retr1[k], retr2[k]) for k in retr1)
    assert any(not torch.equal(lora1[k], lora0[k]) for k in lora0), "RALT must change the adapter"
    assert any(not torch.equal(retr1[k], retr0[k]) for k in retr0), "LSR must change the retriever"
    assert all(isinstance(v, float) for v in r1.metrics.values())
