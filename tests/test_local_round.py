"""One local round: RA-DIT schedules, and determinism (the federated one-client == centralized proof rests on it)."""

import torch

from fedrag_app.config.app_config import AppConfig, TrainConfig
from fedrag_app.data.loaders import QAExample, load_web_questions
from fedrag_app.rag.generator import load_lora_state_dict, lora_state_dict
from fedrag_app.rag.knowledge_store import KnowledgeStore
from fedrag_app.training.local_round import phases, round_examples, round_mmlu, run_local_round

TINY = {
    "train.mode": "ra-dit",
    "train.max-steps": 1,
    "train.num-examples": 4,
    "ralt.batch-size": 2,
    "ralt.max-seq-len": 192,
    "lsr.batch-size": 2,
    "lsr.top-k": 2,
    "lsr.max-seq-len": 192,
}


def test_ra_dit_schedules():
    assert phases(TrainConfig(mode="ralt"), 1) == ["ralt"]
    assert phases(TrainConfig(mode="lsr"), 2) == ["lsr"]
    assert phases(TrainConfig(mode="ra-dit", ra_dit_schedule="joint"), 3) == ["lsr", "ralt"]
    assert phases(TrainConfig(mode="ra-dit", ra_dit_schedule="ralt-first"), 3) == ["ralt", "lsr"]
    alternate = TrainConfig(mode="ra-dit", ra_dit_schedule="alternate")
    assert [phases(alternate, r) for r in (1, 2, 3)] == [["lsr"], ["ralt"], ["lsr"]]


PARTITION = [QAExample(f"q{i}", f"question {i}?", (f"first {i}", f"second {i}", f"third {i}"), "") for i in range(30)]


def ids(examples):
    return [e.id for e in examples]


def test_three_rounds_train_on_distinct_questions_not_the_first_n_again():
    rounds = [ids(round_examples(PARTITION, 8, seed=7, server_round=r)) for r in (1, 2, 3)]
    assert [len(r) for r in rounds] == [8, 8, 8]
    assert len(set(rounds[0] + rounds[1] + rounds[2])) == 24
    assert rounds[1] != ids(PARTITION[:8]) and rounds[0] != rounds[1]


def test_rounds_cover_the_whole_partition_once_per_pass_then_wrap():
    walk = [e for r in range(1, 9) for e in round_examples(PARTITION, 8, seed=7, server_round=r)]  # 64 = 2 passes + 4
    assert sorted(ids(walk[:30])) == sorted(ids(PARTITION)) and sorted(ids(walk[30:60])) == sorted(ids(PARTITION))
    assert ids(walk[:30]) != ids(walk[30:60]), "each pass in its own shuffle"
    assert (
        {e.turn for e in walk[:30]} == {0}
        and {e.turn for e in walk[30:60]} == {1}
        and {e.turn for e in walk[60:]} == {2}
    )
    assert {e.target for e in walk[30:60]} == {f"second {i}" for i in range(30)}, (
        "the second pass trains the second answers"
    )
    everything = round_examples(PARTITION, 0, seed=7, server_round=2)  # 0 = all: round 2 is the second pass
    aligned = [e for r in (4, 5, 6) for e in round_examples(PARTITION, 10, seed=7, server_round=r)]  # pass 2 exactly
    assert ids(everything) == ids(aligned) and round_examples(PARTITION, 100, seed=7, server_round=2) == everything
    assert sorted(ids(everything)) == sorted(ids(walk[30:60]))
    assert ids(round_examples(PARTITION, 8, seed=8, server_round=1)) != ids(walk[:8]), "the seed picks the order"


def test_a_round_that_straddles_two_passes_never_takes_a_question_twice():
    """7 a round over 30 questions: rounds 5, 9, 13, ... each take the last items of one pass and the first of the
    next. Each round holds 7 distinct questions, and every pass still covers all 30."""
    for seed in range(40):
        rounds = [ids(round_examples(PARTITION, 7, seed=seed, server_round=r)) for r in range(1, 14)]
        assert all(len(set(r)) == 7 for r in rounds), f"seed {seed}: a question twice in one round"
        flat = [q for r in rounds for q in r]
        assert sorted(flat[:30]) == sorted(flat[30:60]) == sorted(ids(PARTITION))
    picked = round_mmlu(list(range(10)), 4, seed=1, server_round=3)  # the mixture's walk: its own, same rules
    assert len(set(picked)) == 4 and round_mmlu([], 4, seed=1, server_round=3) == []
    assert round_examples([], 8, seed=1, server_round=2) == []


def test_a_resumed_round_equals_the_uninterrupted_one():
    uninterrupted = [round_examples(PARTITION, 7, seed=3, server_round=r) for r in range(1, 6)]
    assert round_examples(list(PARTITION), 7, seed=3, server_round=3) == uninterrupted[2]
    assert round_examples(PARTITION, 7, seed=3, server_round=5) == uninterrupted[4]  # wraps into pass 2


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
    assert r1.example_ids == tuple(ids(round_examples(examples, 4, cfg.runtime.seed, 1))) != tuple(ids(examples[:4]))
    assert 0.0 < r1.metrics["lsr-target-entropy-norm"] <= 1.0 and r1.metrics["lsr-kl-first"] >= 0.0
    assert all(torch.equal(lora1[k], lora2[k]) for k in lora1)
    assert all(torch.equal(retr1[k], retr2[k]) for k in retr1)
    assert any(not torch.equal(lora1[k], lora0[k]) for k in lora0), "RALT must change the adapter"
    assert any(not torch.equal(retr1[k], retr0[k]) for k in retr0), "LSR must change the retriever"
    assert all(isinstance(v, float) for v in r1.metrics.values())


def test_a_round_mixes_in_its_share_of_the_multiple_choice_questions_that_fit(
    generator, retriever, small_shard_path, data_dir
):
    """ralt.mmlu-ratio 1 over 4 questions: 4 multiple-choice sequences a round, drawn only from questions whose prompt
    fits ralt.max-seq-len; a pool of questions too long to fit mixes nothing in rather than cutting their prompts."""
    from fedrag_app.data.loaders import load_mmlu_pool

    cfg = AppConfig.from_flat({**TINY, "train.mode": "ralt", "ralt.mmlu-ratio": 1.0, "ralt.top-k": 1})
    examples = load_web_questions("train", cfg.data)[:10]
    pool = load_mmlu_pool(cfg.data, ())
    long = [q for q in pool if len(q.question) + sum(map(len, q.choices)) > 2000][:6]
    short = [q for q in pool if q.subject == "high_school_mathematics"][:6]
    lora0 = lora_state_dict(generator)
    counts = []
    try:
        for mmlu in (long, long + short):
            load_lora_state_dict(generator, lora0)
            with KnowledgeStore.open(path=small_shard_path) as store:
                result = run_local_round(cfg, generator, retriever, store, examples, server_round=3, mmlu=mmlu)
            counts.append(result.metrics["ralt-mmlu-sequences"])
    finally:
        load_lora_state_dict(generator, lora0)
    assert len(long) == 6 and counts == [0.0, 4.0]


def test_an_lsr_round_weighs_its_update_by_the_questions_the_gate_kept(generator, retriever, small_shard_path):
    """The FedAvg weight of an LSR-only round (train.mode = lsr, or RA-DIT's alternate schedule in an odd round) counts
    the questions LSR learned from, not those it was given: lsr.gate at a margin no passage reaches keeps none, so the
    weight is 0 (the server then leaves the reply out); a RALT round counts every question."""
    examples = load_web_questions("train", AppConfig.from_flat(TINY).data)[:10]
    lora0, retr0 = lora_state_dict(generator), retriever.trainable_state_dict()
    lsr = {**TINY, "train.mode": "lsr", "lsr.gate": True}
    try:
        with KnowledgeStore.open(path=small_shard_path) as store:
            shut = AppConfig.from_flat({**lsr, "lsr.gate-margin": 1e6})
            none = run_local_round(shut, generator, retriever, store, examples)
            alternate = AppConfig.from_flat({**lsr, "train.mode": "ra-dit", "train.ra-dit-schedule": "alternate"})
            odd = run_local_round(alternate, generator, retriever, store, examples, server_round=1)
            even = run_local_round(alternate, generator, retriever, store, examples, server_round=2)
    finally:
        load_lora_state_dict(generator, lora0)
        retriever.load_trainable_state_dict(retr0)
    assert none.num_examples == 0 and none.metrics["lsr-steps"] == 0 and len(none.example_ids) == 4
    assert odd.num_examples == odd.metrics["lsr-examples"] == round(4 * odd.metrics["lsr-gate-kept"])
    assert even.num_examples == 4 and "lsr-examples" not in even.metrics
