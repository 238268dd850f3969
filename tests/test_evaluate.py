"""Evaluation on the real SmolLM2 and real questions: letter scoring checked against a hand computation."""

import dataclasses

import pytest
import torch

from fedrag_app.config.app_config import AppConfig, DataConfig
from fedrag_app.data.loaders import CHOICE_LETTERS, QAExample, load_mmlu
from fedrag_app.evaluation.evaluate import (
    evaluate_mmlu,
    evaluate_retrieval,
    letter_token_ids,
    mmlu_letter_logprobs,
    run_evaluation,
)
from fedrag_app.evaluation.metrics import parse_choice_letter
from fedrag_app.rag.generator import generate, generate_scored
from fedrag_app.rag.knowledge_store import Hit, KnowledgeStore
from fedrag_app.rag.prompts import build_mmlu_prompt


@pytest.fixture(scope="module")
def questions(data_dir):
    return load_mmlu(DataConfig(dir=str(data_dir)), limit=4)


def _unpadded_letter_logprobs(generator, prompts) -> torch.Tensor:
    """One prompt at a time, no padding: the log-probabilities of ' A'..' D' by hand."""
    letters, rows = letter_token_ids(generator.tokenizer), []
    for prompt in prompts:
        ids = generator.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            rows.append(torch.log_softmax(generator.model(input_ids=ids).logits[0, -1].float(), dim=-1)[letters])
    return torch.stack(rows)


def test_letter_scores_equal_a_hand_computation_on_unpadded_prompts(generator, questions):
    prompts = [build_mmlu_prompt(generator.tokenizer, q.question, q.choices) for q in questions]
    batched = mmlu_letter_logprobs(generator, prompts, batch_size=4)  # (4, 4), left-padded
    torch.testing.assert_close(batched, _unpadded_letter_logprobs(generator, prompts), atol=2e-3, rtol=0)
    assert torch.equal(batched.argmax(-1), _unpadded_letter_logprobs(generator, prompts).argmax(-1))


def test_letter_scores_see_each_prompt_from_position_0_despite_left_padding(generator, questions):
    """Left-padded prompts get position ids from the attention mask (a plain forward would shift them; only RoPE
    models shrug that off, and generator.model is configurable)."""
    prompts = [build_mmlu_prompt(generator.tokenizer, q.question, q.choices) for q in questions]
    seen = []
    hook = generator.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        mmlu_letter_logprobs(generator, prompts, batch_size=4)
    finally:
        hook.remove()
    mask, positions = seen[0]["attention_mask"], seen[0].get("position_ids")
    assert mask.min() == 0, "the test needs a padded batch"
    assert positions is not None
    for row_mask, row_positions in zip(mask, positions):
        real = row_mask.bool()
        assert torch.equal(row_positions[real].cpu(), torch.arange(int(real.sum())))


def _with_answers(questions, answers):
    return [dataclasses.replace(q, answer=a) for q, a in zip(questions, answers)]


def test_accuracy_on_a_tiny_case_is_the_hand_counted_share(generator, questions):
    """Answer keys set by hand against the model's own unpadded choice: all right, none right, one in four right."""
    prompts = [build_mmlu_prompt(generator.tokenizer, q.question, q.choices) for q in questions]
    best = [CHOICE_LETTERS[i] for i in _unpadded_letter_logprobs(generator, prompts).argmax(-1).tolist()]
    other = [CHOICE_LETTERS[(CHOICE_LETTERS.index(b) + 1) % 4] for b in best]
    for answers, expected in ((best, 1.0), (other, 0.0), (best[:1] + other[1:], 0.25)):
        result = evaluate_mmlu(generator, _with_answers(questions, answers), protocol="loglik")
        assert result["mmlu-loglik-accuracy"] == expected and result["mmlu-loglik-n"] == 4
    texts = [generate(generator, [p], max_new_tokens=4, batch_size=1)[0] for p in prompts]  # one at a time
    parsed = [parse_choice_letter(t) for t in texts]
    expected = sum(p == q.answer for p, q in zip(parsed, questions)) / 4
    generated = evaluate_mmlu(generator, questions, protocol="generate", max_new_tokens=4)
    assert generated["mmlu-generate-accuracy"] == expected and generated["mmlu-generate-n"] == 4
    result = evaluate_mmlu(generator, questions, protocol="loglik")
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
    hits = [
        [Hit("a", 0.9, "Lyon", "a city"), Hit("b", 0.8, "France", "Paris is the capital")],
        [Hit("c", 0.9, "X", "none")],
    ]
    result = evaluate_retrieval(hits, examples, k=2)
    assert result["retrieval-recall@2"] == 0.5 and result["retrieval-mrr@2"] == 0.25


def test_run_evaluation_with_and_without_retrieval(generator, retriever, small_shard_path, data_dir):
    cfg = AppConfig.from_flat(
        {
            "data.dir": str(data_dir),
            "eval.mmlu-limit": 3,
            "eval.web-questions-limit": 3,
            "eval.recall-k": 5,
            "generator.max-new-tokens": 8,
        }
    )
    with KnowledgeStore.open(path=small_shard_path) as store:
        rag = run_evaluation(cfg, generator, retriever, store)
    closed = run_evaluation(cfg, generator)
    for key in (
        "mmlu-loglik-accuracy",
        "mmlu-generate-accuracy",
        "wq-em",
        "wq-f1",
        "retrieval-recall@5",
        "retrieval-mrr@5",
    ):
        assert 0.0 <= rag[key] <= 1.0, key
    assert rag["eval-retrieval"] == 1.0 and closed["eval-retrieval"] == 0.0
    assert "retrieval-recall@5" not in closed
    with KnowledgeStore.open(path=small_shard_path) as store:
        again = run_evaluation(cfg, generator, retriever, store)
    scores = {k: v for k, v in rag.items() if "seconds" not in k and "s-per" not in k}
    assert scores == {k: v for k, v in again.items() if k in scores}, "evaluation must be deterministic"
