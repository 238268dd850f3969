"""Metrics against hand-computed values, including the cases FedRAG gets wrong."""

import pytest

from fedrag_app.evaluation.metrics import (
    RunningMean,
    answer_rank,
    exact_match,
    normalize_answer,
    parse_choice_letter,
    recall_at_k,
    reciprocal_rank,
    token_f1,
)


def test_running_mean_that_starts_with_zeros():
    mean = RunningMean()
    assert [mean.add(v) for v in (0, 0, 1)] == [0.0, 0.0, pytest.approx(1 / 3)]  # FedRAG's Benchmarker says 1.0
    assert RunningMean().value == 0.0


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("The Beatles", "beatles"),
        ("  Paris. ", "paris"),
        ("an Apple!", "apple"),
        ("George   Washington", "george washington"),
    ],
)
def test_normalisation_makes_these_equal(pred, gold):
    assert normalize_answer(pred) == normalize_answer(gold)
    assert exact_match(pred, [gold]) == 1.0


def test_exact_match_takes_the_best_alias_and_is_strict_otherwise():
    assert exact_match("Jaxon Bieber", ["Jazmyn Bieber", "Jaxon Bieber"]) == 1.0
    assert exact_match("Jaxon", ["Jaxon Bieber"]) == 0.0


def test_f1_by_hand():
    # pred tokens {jaxon, bieber, brother}, gold {jaxon, bieber}: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("Jaxon Bieber brother", ["Jaxon Bieber"]) == pytest.approx(0.8)
    assert token_f1("Jaxon Bieber brother", ["nothing", "Jaxon Bieber"]) == pytest.approx(0.8)
    assert token_f1("the", ["a"]) == 1.0  # both normalise to empty
    assert token_f1("paris", ["london"]) == 0.0


def test_recall_and_mrr_on_hand_made_hits():
    passages = ["Rome is in Italy.", "Its first president was George Washington.", "Washington, D.C."]
    rank = answer_rank(passages, ["George Washington", "G. Washington"])
    assert rank == 2
    assert (recall_at_k(rank, 1), recall_at_k(rank, 2)) == (0.0, 1.0)
    assert (reciprocal_rank(rank, 1), reciprocal_rank(rank, 3)) == (0.0, 0.5)
    assert answer_rank(["Washingtonia palms"], ["Washington"]) is None  # whole words only


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("C.", "C"),
        ("(D) 40%", "D"),
        ("Answer: A", "A"),
        (" B) 20%", "B"),
        ("The answer is C", "C"),
        ("10%", None),
        ("I don't know", None),
        ("", None),
    ],
)
def test_letter_parsing(text, letter):
    assert parse_choice_letter(text) == letter
