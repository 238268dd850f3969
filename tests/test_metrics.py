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


def test_the_plot_has_a_panel_per_scale_integer_rounds_and_starts_at_round_0(tmp_path):
    """metrics.png: the loss, Web Questions, retrieval and MMLU each on their own axis (a 0.08 F1 next to a 0.45 recall
    would flatten one of them), rounds as integers, and the initial model's evaluation as round 0."""
    import matplotlib.pyplot as plt

    from fedrag_app.evaluation.reporting import PANELS, metrics_figure, plot_metrics

    rows = [
        {"round": 0, "wq-f1": 0.08, "retrieval-recall@10": 0.45, "mmlu-circular-accuracy": 0.3},
        {"round": 1, "train-ralt-loss-mean": 2.0, "wq-f1": 0.12, "retrieval-recall@10": 0.45},
        {"round": 2, "train-ralt-loss-mean": 1.5, "wq-f1": 0.15, "retrieval-recall@10": 0.45},
    ]
    fig = metrics_figure(rows)
    try:
        axes = {a.get_title(): a for a in fig.axes}
        assert list(axes) == list(PANELS)
        f1 = next(line for line in axes["Web Questions (server)"].lines if line.get_label() == "wq-f1")
        assert list(f1.get_xdata()) == [0, 1, 2] and list(f1.get_ydata()) == [0.08, 0.12, 0.15]
        assert [line.get_label() for line in axes["training loss (client mean)"].lines] == ["ralt-loss-mean"]
        ticks = axes["Web Questions (server)"].get_xticks()
        assert all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)
    plot_metrics(rows, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").stat().st_size > 0
