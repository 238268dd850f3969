"""Evaluation on the real SmolLM2 and real questions: letter scoring checked against a hand computation."""

import dataclasses

import pytest
import torch

from fedrag_app.config.app_config import AppConfig, DataConfig
from fedrag_app.data.loaders import CHOICE_LETTERS, QAExample, load_mmlu
from fedrag_app.evaluation.evaluate import evaluate_retrieval, run_evaluation
from fedrag_app.evaluation.metrics import parse_choice_letter
from fedrag_app.evaluation.mmlu import (
    CATEGORY,
    broad_sample,
    circular_scores,
    evaluate_mmlu,
    letter_token_ids,
    rotated,
)
from fedrag_app.rag.generator import generate
from fedrag_app.rag.knowledge_store import Hit, KnowledgeStore
from fedrag_app.rag.prompts import build_mmlu_prompt, build_prompt


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
    """loglik's letter scores come from the shared-prefix pass: the numbers of one whole prompt at a time."""
    prompts = [build_mmlu_prompt(generator.tokenizer, q.question, q.choices) for q in questions]
    records: list[dict] = []
    evaluate_mmlu(generator, questions, protocols=("loglik",), records=records)
    scores = torch.tensor([r["loglik"]["scores"] for r in records])
    torch.testing.assert_close(scores, _unpadded_letter_logprobs(generator, prompts), atol=2e-3, rtol=0)
    assert torch.equal(scores.argmax(-1), _unpadded_letter_logprobs(generator, prompts).argmax(-1))


def _with_answers(questions, answers):
    return [dataclasses.replace(q, answer=a) for q, a in zip(questions, answers)]


def test_accuracy_on_a_tiny_case_is_the_hand_counted_share(generator, questions):
    """Answer keys set by hand against the model's own unpadded choice: all right, none right, one in four right."""
    prompts = [build_mmlu_prompt(generator.tokenizer, q.question, q.choices) for q in questions]
    best = [CHOICE_LETTERS[i] for i in _unpadded_letter_logprobs(generator, prompts).argmax(-1).tolist()]
    other = [CHOICE_LETTERS[(CHOICE_LETTERS.index(b) + 1) % 4] for b in best]
    for answers, expected in ((best, 1.0), (other, 0.0), (best[:1] + other[1:], 0.25)):
        result = evaluate_mmlu(generator, _with_answers(questions, answers), protocols=("loglik",))
        assert result["mmlu-loglik-accuracy"] == expected and result["mmlu-loglik-n"] == 4
    texts = [generate(generator, [p], max_new_tokens=4, batch_size=1)[0] for p in prompts]  # one at a time
    parsed = [parse_choice_letter(t) for t in texts]
    expected = sum(p == q.answer for p, q in zip(parsed, questions)) / 4
    generated = evaluate_mmlu(generator, questions, protocols=("generate",), max_new_tokens=4)
    assert generated["mmlu-generate-accuracy"] == expected and generated["mmlu-generate-n"] == 4
    result = evaluate_mmlu(generator, questions, protocols=("loglik",))
    both = evaluate_mmlu(generator, questions, protocols=("loglik", "generate"), max_new_tokens=4)
    for key in ("mmlu-loglik-accuracy", "mmlu-generate-accuracy", "mmlu-loglik-n", "mmlu-generate-n"):
        assert both[key] == {**result, **generated}[key], key


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
            "eval.mmlu-protocols": "loglik,generate",  # the others have tests of their own
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


def test_circular_scoring_cancels_a_letter_prior_that_letter_scoring_reports():
    """Each choice has its own worth; the model adds +5 to whichever choice stands at 'C'. Letter scoring then
    answers C to everything; circular scoring recovers each question's best choice."""
    worth = torch.tensor([[0.3, 1.0, 0.1, 0.2], [2.0, 0.0, 0.5, 0.1], [0.0, 0.1, 0.2, 1.5]])  # (N, 4) by choice
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])  # by position
    per_rotation = torch.stack(
        [torch.stack([worth[:, (p + r) % 4] + bias[p] for p in range(4)], dim=-1) for r in range(4)], dim=1
    )  # (N, R, 4): position p of rotation r shows choice (p + r) mod 4
    assert per_rotation[:, 0].argmax(-1).tolist() == [2, 2, 2]
    assert circular_scores(per_rotation).argmax(-1).tolist() == worth.argmax(-1).tolist()
    assert rotated(["a", "b", "c", "d"], 1) == ["b", "c", "d", "a"]


def test_circular_and_cloze_scores_equal_hand_computations(generator, questions):
    """circular: four rotated prompts scored one at a time without padding, normalised over the letters and averaged
    by choice; cloze: each choice after the open-question prompt, full sequence, no cache, over its characters."""
    tok, qs = generator.tokenizer, questions[:2]
    records: list[dict] = []
    evaluate_mmlu(generator, qs, protocols=("circular", "cloze"), batch_size=3, records=records)
    for q, record in zip(qs, records):
        by_rotation = torch.log_softmax(
            _unpadded_letter_logprobs(
                generator, [build_mmlu_prompt(tok, q.question, rotated(q.choices, r)) for r in range(4)]
            ),
            dim=-1,
        )
        hand = [sum(by_rotation[r, (j - r) % 4] for r in range(4)) / 4 for j in range(4)]
        torch.testing.assert_close(torch.tensor(record["circular"]["scores"]), torch.stack(hand), atol=3e-3, rtol=0)
        prompt_ids = tok(build_prompt(tok, q.question), add_special_tokens=False)["input_ids"]
        cloze = []
        for choice in q.choices:
            answer = tok(choice.strip(), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = generator.model(input_ids=torch.tensor([prompt_ids + answer])).logits[0].float()
            logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
            cloze.append(logp[range(len(answer)), answer].sum() / len(choice.strip()))
        torch.testing.assert_close(torch.tensor(record["cloze"]["scores"]), torch.stack(cloze), atol=3e-3, rtol=0)
        assert record["cloze"]["prediction"] == CHOICE_LETTERS[int(torch.stack(cloze).argmax())]


def test_every_report_gives_the_predicted_letters_and_the_majority_baseline(generator, questions):
    answers = ["A", "A", "A", "B"]
    result = evaluate_mmlu(generator, _with_answers(questions, answers), protocols=("loglik", "cloze"))
    assert result["mmlu-majority-baseline"] == 0.75
    for protocol in ("loglik", "cloze"):
        shares = [result[f"mmlu-{protocol}-pred-{letter}"] for letter in CHOICE_LETTERS]
        assert sum(shares) == pytest.approx(1.0) and all(s in (0, 0.25, 0.5, 0.75, 1.0) for s in shares)


def test_the_broad_sample_is_fixed_covers_every_subject_and_reports_each_category(data_dir):
    everything = load_mmlu(DataConfig(dir=str(data_dir)), "all", "test")
    sample = broad_sample(everything, 20, seed=0)
    subjects = {q.subject for q in everything}
    assert len(subjects) == 57 and subjects <= set(CATEGORY), "every subject has a category"
    assert len(sample) == 57 * 20 and {q.subject for q in sample} == subjects
    assert [q.id for q in broad_sample(everything, 20, seed=0)] == [q.id for q in sample]
    assert [q.id for q in broad_sample(everything, 20, seed=1)] != [q.id for q in sample]
    assert sorted(set(CATEGORY.values())) == ["humanities", "other", "social-sciences", "stem"]


def test_run_evaluation_reports_each_subject_and_writes_one_record_per_question(
    generator, retriever, small_shard_path, data_dir
):
    cfg = AppConfig.from_flat(
        {
            "data.dir": str(data_dir),
            "eval.mmlu-subject": "global_facts,all",
            "eval.mmlu-per-subject": 1,
            "eval.mmlu-limit": 6,
            "eval.mmlu-protocols": "loglik,circular",
            "eval.mmlu-broad-protocols": "loglik,circular",
            "eval.web-questions-limit": 2,
            "eval.top-k": 1,
            "eval.recall-k": 3,
            "generator.max-new-tokens": 4,
        }
    )
    records: list[dict] = []
    with KnowledgeStore.open(path=small_shard_path) as store:
        result = run_evaluation(cfg, generator, retriever, store, records=records)
    assert result["mmlu-circular-n"] == 6 and result["mmlu-all-circular-n"] == 6
    assert {"mmlu-all-stem-circular-accuracy", "mmlu-all-other-loglik-accuracy"} <= set(result)
    mmlu = [r for r in records if r["dataset"] == "mmlu"]
    wq = [r for r in records if r["dataset"] == "web_questions"]
    assert len(mmlu) == 12 and len(wq) == 2 and len({r["id"] for r in mmlu}) == 12
    assert all(len(r["retrieved"]) == 1 and r["circular"]["prediction"] in CHOICE_LETTERS for r in mmlu)
    assert all(len(r["retrieved"]) == 3 and "answer_rank" in r and 0 <= r["f1"] <= 1 for r in wq)
    accuracy = sum(r["circular"]["correct"] for r in mmlu[:6]) / 6
    assert result["mmlu-circular-accuracy"] == pytest.approx(accuracy)
