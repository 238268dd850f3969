"""RALT on the real SmolLM2: labels, truncation, the shared template, the loss maths, and that it learns."""

import random

import pytest
import torch

from fedrag_app.config.app_config import RaltConfig
from fedrag_app.data.loaders import QAExample
from fedrag_app.rag.generator import load_lora_state_dict, lora_state_dict
from fedrag_app.rag.knowledge_store import Hit
from fedrag_app.rag.lm_scoring import answer_nll
from fedrag_app.rag.prompts import answer_target, build_prompt, format_passage
from fedrag_app.training.ralt import build_ralt_sequences, trainable_lora_parameters
from fedrag_app.training.sequences import IGNORE, build_sequence, collate, make_batches

PASSAGE = format_passage(
    "George Washington", "George Washington was the first president of the United States, from 1789 to 1797."
)


@pytest.fixture
def restore_lora(generator):
    saved = lora_state_dict(generator)
    yield
    load_lora_state_dict(generator, saved)


def test_prompt_and_context_tokens_carry_ignore_and_the_answer_is_labelled(generator):
    tok = generator.tokenizer
    seq = build_sequence(tok, "who was the first president?", PASSAGE, "George Washington", 512)
    prompt_ids = tok(build_prompt(tok, "who was the first president?", [PASSAGE]), add_special_tokens=False)[
        "input_ids"
    ]
    answer_ids = tok(answer_target(tok, "George Washington"), add_special_tokens=False)["input_ids"]
    assert seq.input_ids == prompt_ids + answer_ids
    assert seq.labels == [IGNORE] * len(prompt_ids) + answer_ids
    assert answer_ids[-1] == tok.eos_token_id


def test_training_prompt_is_the_inference_prompt(generator):
    tok = generator.tokenizer
    seq = build_sequence(tok, "q?", PASSAGE, "a", 512)
    n_prompt = sum(1 for t in seq.labels if t == IGNORE)
    assert tok.decode(seq.input_ids[:n_prompt]) == build_prompt(tok, "q?", [PASSAGE])


def test_truncation_cuts_the_passage_and_keeps_answer_and_eos_whole(generator):
    tok = generator.tokenizer
    long_passage = format_passage("Long", " ".join(["filler words about history"] * 200))
    answer = "Jazmyn Bieber, Jaxon Bieber"
    seq = build_sequence(tok, "what is the name of justin bieber brother?", long_passage, answer, 128)
    answer_ids = tok(answer_target(tok, answer), add_special_tokens=False)["input_ids"]
    assert len(seq.input_ids) <= 128
    assert seq.input_ids[-len(answer_ids) :] == answer_ids
    assert [t for t in seq.labels if t != IGNORE] == answer_ids
    assert "Question: what is the name of justin bieber brother?" in tok.decode(seq.input_ids)


def test_k_sequences_per_pair_plus_no_context_share(generator):
    examples = [QAExample(str(i), f"question {i}?", (f"answer {i}",), "") for i in range(4)]
    hits = [[Hit(f"p{i}{j}", 1.0, "T", f"text {j}") for j in range(3)] for i in range(4)]
    seqs = build_ralt_sequences(
        generator.tokenizer, examples, hits, RaltConfig(top_k=2, no_context_ratio=0.5), random.Random(0)
    )
    assert len(seqs) == 4 * 2 + 2
    no_ctx = [s for s in seqs if "Context:" not in generator.tokenizer.decode(s.input_ids)]
    assert len(no_ctx) == 2


def test_a_many_answer_question_trains_on_one_gold_answer_that_can_exact_match(generator):
    from fedrag_app.evaluation.metrics import exact_match

    tok = generator.tokenizer
    bieber = QAExample("0", "what is the name of justin bieber brother?", ("Jazmyn Bieber", "Jaxon Bieber"), "")
    hits = [[Hit("p", 1.0, "Justin Bieber", "Justin Bieber has a brother, Jaxon, and a sister, Jazmyn.")]]
    (seq,) = build_ralt_sequences(tok, [bieber], hits, RaltConfig(top_k=1), random.Random(0))
    taught = tok.decode([t for t in seq.labels if t != IGNORE], skip_special_tokens=True)
    assert taught == "Jazmyn Bieber" and exact_match(taught, bieber.answers) == 1.0


def test_length_grouping_puts_similar_lengths_together():
    from fedrag_app.training.sequences import LabelledSequence

    seqs = [LabelledSequence([1] * n, [IGNORE] * n) for n in random.Random(1).sample(range(10, 400), 64)]
    grouped = make_batches(seqs, 8, length_grouping=True, rng=random.Random(0))
    plain = make_batches(seqs, 8, length_grouping=False, rng=random.Random(0))

    def padding(batches):
        return sum(max(len(s.input_ids) for s in b) * len(b) - sum(len(s.input_ids) for s in b) for b in batches)

    assert sorted(id(s) for b in grouped for s in b) == sorted(id(s) for s in seqs)
    assert padding(grouped) < padding(plain) / 4


def test_loss_equals_manual_cross_entropy_over_answer_and_eos(generator):
    tok = generator.tokenizer
    seqs = [
        build_sequence(tok, "who was the first president?", PASSAGE, "George Washington", 512),
        build_sequence(tok, "capital of france?", None, "Paris", 512),
    ]
    batch = collate(seqs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ours = answer_nll(generator.model, **batch)
        per_seq = []
        for s in seqs:  # unpadded, full logits, the textbook shift
            logits = generator.model(input_ids=torch.tensor([s.input_ids])).logits[0]  # (T, V)
            labels = torch.tensor(s.labels)
            per_seq.append(torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE))
    assert ours.item() == pytest.approx(torch.stack(per_seq).mean().item(), rel=1e-4)


def test_only_lora_trains(generator):
    params = trainable_lora_parameters(generator)
    assert sum(p.numel() for p in params) == 460_800


def test_loss_falls_over_a_few_steps_on_a_fixed_tiny_set(generator, restore_lora):
    tok = generator.tokenizer
    seqs = [
        build_sequence(tok, "who was the first president?", PASSAGE, "George Washington", 256),
        build_sequence(tok, "what is the capital of france?", None, "Paris", 256),
    ]
    batch = collate(seqs, tok.pad_token_id, "cpu")
    optimizer = torch.optim.AdamW(trainable_lora_parameters(generator), lr=2e-3)
    generator.model.train()
    losses = []
    for _ in range(6):
        loss = answer_nll(generator.model, **batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    generator.model.eval()
    assert losses[-1] < losses[0] * 0.7, losses


def test_the_multiple_choice_mixture_is_prompted_as_evaluation_and_teaches_no_letter(generator, data_dir):
    """Every pool question with gold 'A': the mixture still answers with each letter about a quarter of the time, the
    prompt is MMLU evaluation's prompt for the shuffled choices, and only ' X' + EOS carries labels."""
    import dataclasses
    import itertools

    from fedrag_app.config.app_config import DataConfig
    from fedrag_app.data.loaders import CHOICE_LETTERS, load_mmlu_pool
    from fedrag_app.evaluation.mmlu import letter_token_ids
    from fedrag_app.rag.prompts import build_mmlu_prompt
    from fedrag_app.training.ralt import mixture_sequences

    tok = generator.tokenizer
    pool = [dataclasses.replace(q, answer="A") for q in load_mmlu_pool(DataConfig(dir=str(data_dir)), ())[:200]]
    hits = [[Hit("p", 1.0, "Title", "Some passage text.")] for _ in pool]
    sequences = mixture_sequences(tok, pool, hits, RaltConfig(top_k=1, max_seq_len=2048), random.Random(0))
    letters = letter_token_ids(tok)
    taught = []
    for q, s in zip(pool, sequences):
        labelled = [t for t in s.labels if t != IGNORE]
        assert labelled[1:] == [tok.eos_token_id] and labelled[0] in letters
        letter = CHOICE_LETTERS[letters.index(labelled[0])]
        prompt = s.input_ids[: len(s.input_ids) - 2]
        passage = [format_passage("Title", "Some passage text.")]
        shown = [
            list(order)
            for order in itertools.permutations(q.choices)
            if tok(build_mmlu_prompt(tok, q.question, order, passage), add_special_tokens=False)["input_ids"] == prompt
        ]
        assert shown and shown[0][CHOICE_LETTERS.index(letter)] == q.choices[0], "the letter names the gold choice"
        taught.append(letter)
    shares = [taught.count(letter) / len(taught) for letter in CHOICE_LETTERS]
    assert min(shares) > 0.15, f"letters taught {shares}"


def test_the_mixture_leaves_out_questions_that_would_lose_the_start_of_their_prompt(generator, data_dir):
    """At 256 tokens about 1 in 8 MMLU dev/val questions cannot fit even without a passage: cutting them from the
    front would teach a letter for a question the model never sees whole. Those are left out, the rest kept, and
    every kept question's sequence (with a passage) still holds its whole question and choices."""
    from fedrag_app.config.app_config import DataConfig
    from fedrag_app.data.loaders import load_mmlu_pool
    from fedrag_app.rag.prompts import build_mmlu_prompt
    from fedrag_app.training.ralt import mixture_fits, mixture_sequences

    tok = generator.tokenizer
    pool = load_mmlu_pool(DataConfig(dir=str(data_dir)), ())
    law = [q for q in pool if q.subject == "professional_law"][:40]
    short = [q for q in pool if q.subject == "high_school_mathematics"][:40]
    kept = mixture_fits(tok, law + short, 256)
    assert 0 < len([q for q in kept if q in law]) < len(law), "some law questions fit, some do not"
    assert [q for q in kept if q in short] == short
    for q in kept:
        alone = tok(build_mmlu_prompt(tok, q.question, q.choices, []), add_special_tokens=False)["input_ids"]
        assert len(alone) + 2 <= 256
    hits = [[Hit("p", 1.0, "Title", "word " * 400)] for _ in kept]
    for q, s in zip(kept, mixture_sequences(tok, kept, hits, RaltConfig(top_k=1, max_seq_len=256), random.Random(0))):
        assert len(s.input_ids) <= 256
        assert tok.decode(s.input_ids).count(q.question.strip()[:40]) == 1, "the question keeps its start"


def test_no_mmlu_test_question_enters_the_training_pool(data_dir):
    """MMLU's dev/val and test splits share a few questions word for word; the pool drops them."""
    from fedrag_app.config.app_config import DataConfig
    from fedrag_app.data.loaders import load_mmlu, load_mmlu_pool

    cfg = DataConfig(dir=str(data_dir))
    tested = {(q.question, tuple(q.choices)) for q in load_mmlu(cfg, "all", "test")}
    everything = [q for split in ("dev", "val") for q in load_mmlu(cfg, "all", split)]
    pool = load_mmlu_pool(cfg, ())
    assert len(pool) < len(everything), "the data holds such copies, so the test can fail"
    assert not [q for q in pool if (q.question, tuple(q.choices)) in tested]
