"""Evaluation on the real SmolLM2 and real questions: letter scoring checked against a hand computation."""

import pytest
import torch

from fedrag_app.config import AppConfig, DataConfig
from fedrag_app.data import QAExample, load_mmlu
from fedrag_app.generator import generate, generate_scored
from fedrag_app.evaluate import evaluate_mmlu, evaluate_retrieval, letter_token_ids, mmlu_letter_logprobs, run_evaluation
from fedrag_app.knowledge_store import Hit, KnowledgeStore
from fedrag_app.prompts import CHOICE_LETTERS, build_mmlu_prompt


@pytest.fixture(scope="module")
def questions(data_dir):
    return load_mmlu(DataConfig(dir=str(data_dir)), limit=4)


def test_letter_scores_equal_a_hand_computation_on_unpadded_prompts(generator, questions):
    prompts = [build_mmlu_prompt(generator.tokenizer, q.question, q.choices) for q in questions]
    batched = mmlu_letter_logprobs(generator, prompts, batch_size=4)  # (4, 4), left-padded
    letters = letter_token_ids(generator.tokenizer)
    for row, prompt in zip(batched, prompts):
        ids = generator.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(generator.model(input_ids=ids).logits[0, -1].float(), dim=-1)
        torch.testing.assert_close(row, logp[letters], atol=2e-3, rtol=0)
        assert row.argmax() == logp[letters].argmax()


def test_accuracy_counts_the_argmax_letter(generator, questions):
    prompts = [build_mmlu_prompt(generator.tokenizer, q.question, q.choices) for q in questions]
    chosen = [CHOICE_LETTERS[i] for i in mmlu_letter_logprobs(generator, prompts).argmax(-1).tolist()]
    expected = sum(c == q.answer for c, q in zip(chosen, questions)) / len(questions)
    result = evaluate_mmlu(generator, questions, protocol="loglik")
    assert result["mmlu-loglik-accuracy"] == pytest.approx(expected) and result["mmlu-loglik-n"] == 4
    generated = evaluate_mmlu(generator, questions, protocol="generate", max_new_tokens=4)
    assert 0.0 <= generated["mmlu-generate-accuracy"] <= 1.0 and generated["mmlu-generate-n"] == 4
    both = evaluate_mmlu(generator, questions, protocol="both", max_new_tokens=4)
    for key in ("mmlu-loglik-accuracy", "mmlu-generate-accuracy", "mmlu-loglik-n", "mmlu-generate-n"):
        assert both[key] == {**result, **generated}[key], key


def test_one_generation_pass_gives_the_letter_scores_of_a_forward(generator, questions):
    """'both' reads the letter log-likelihoods from generation's first step: the same numbers as the forward."""
    prompts = [build_mmlu_prompt(generator.tokenizer, q.question, q.choices) for q in questions]
    letters = letter_token_ids(generator.tokenizer)
    texts, scored = generate_scored(generator, prompts, max_new_tokens=4, batch_size=4, first_token_ids=letters)
    torch.testing.assert_close(scored, mmlu_letter_logprobs(generator, prompts, batch_size=4), atol=2e-3, rtol=0)
    assert texts == generate(generator, prompts, max_new_tokens=4, batch_size=4)


def test_retrieval_metrics_on_hand_made_hits():
    examples = [QAExample("1", "q", ("Paris",), ""), QAExample("2", "q", ("Rome",), "")]
    hits = [[Hit("a", 0.9, "Lyon", "a city"), Hit("b", 0.8, "France", "Paris is the capital")], [Hit("c", 0.9, "X", "none")]]
    result = evaluate_retrieval(hits, examples, k=2)
    assert result["retrieval-recall@2"] == 0.5 and result["retrieval-mrr@2"] == 0.25


def test_run_evaluation_with_and_without_retrieval(generator, retriever, small_shard_path, data_dir):
    cfg = AppConfig.from_flat({"data.dir": str(data_dir), "eval.mmlu-limit": 3, "eval.web-questions-limit": 3,
                               "eval.recall-k": 5, "generator.max-new-tokens": 8})
    with KnowledgeStore.open(path=small_shard_path) as store:
        rag = run_evaluation(cfg, generator, retriever, store)
    closed = run_evaluation(cfg, generator)
    for key in ("mmlu-loglik-accuracy", "mmlu-generate-accuracy", "wq-em", "wq-f1", "retrieval-recall@5", "retrieval-mrr@5"):
        assert 0.0 <= rag[key] <= 1.0, key
    assert rag["eval-retrieval"] == 1.0 and closed["eval-retrieval"] == 0.0
    assert "retrieval-recall@5" not in closed
    with KnowledgeStore.open(path=small_shard_path) as store:
        again = run_evaluation(cfg, generator, retriever, store)
    scores = {k: v for k, v in rag.items() if "seconds" not in k and "s-per" not in k}
    assert scores == {k: v for k, v in again.items() if k in scores}, "evaluation must be deterministic"
