"""Paired comparison of two systems on the same questions (fedrag_app/evaluation/paired.py), on hand-made records
whose answers are known: differences, gained/lost, the exact sign test, the bootstrap interval, and the table
runner's use of them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrag_app.evaluation.paired import bootstrap_interval, compare, gain_share, sign_test_p


def wq(i: int, em: float, f1: float, rank: int | None) -> dict:
    return {"dataset": "web_questions", "id": f"q{i}", "em": em, "f1": f1, "answer_rank": rank}


def mc(i: int, correct: bool, set_name: str = "mmlu") -> dict:
    return {"dataset": "mmlu", "set": set_name, "id": f"m{i}", "circular": {"correct": correct}}


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test_p(10, 0) == pytest.approx(2 / 1024)
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(6, 1) == pytest.approx(2 * (1 + 7) / 128)


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_questions():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.1, 1, 50), rng.normal(0.1, 1, 5000)
    lo, hi = bootstrap_interval(small, 2000)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_interval(large, 2000)
    assert hi2 - lo2 < (hi - lo) / 5


def test_compare_counts_gains_and_losses_question_by_question_over_seeds():
    base = [wq(i, 0.0, 0.2, None) for i in range(20)] + [mc(i, i < 5) for i in range(20)]
    # seed 1 and 2 both answer questions 0-9 exactly; the MC answers: seed 1 gains 5..14, loses 0..4; seed 2 the same
    runs = [
        [wq(i, float(i < 10), 0.2 + 0.5 * (i < 10), 1 if i < 10 else None) for i in range(20)]
        + [mc(i, 5 <= i < 15) for i in range(20)]
        for _ in range(2)
    ]
    out = compare(base, runs, recall_k=10, resamples=2000)
    assert out["wq-em"]["diff"] == pytest.approx(0.5) and out["wq-em"]["gained"] == 10 and out["wq-em"]["lost"] == 0
    assert out["wq-em"]["sign-p"] == pytest.approx(2 / 1024) and out["wq-em"]["low"] > 0
    assert out["wq-f1"]["diff"] == pytest.approx(0.25) and (out["wq-f1"]["gained"], out["wq-f1"]["lost"]) == (10, 0)
    assert out["retrieval-recall@10"]["diff"] == pytest.approx(0.5)
    mmlu = out["mmlu-circular-accuracy"]
    assert (mmlu["gained"], mmlu["lost"], mmlu["diff"]) == (10, 5, pytest.approx(0.25))
    assert mmlu["low"] < 0.25 < mmlu["high"] and out["wq-em"]["n"] == 20


def test_compare_keeps_each_evaluated_set_apart_and_only_shared_questions():
    base = [mc(i, True, "mmlu") for i in range(4)] + [mc(i, False, "mmlu-all") for i in range(4)]
    run = [mc(i, True, "mmlu") for i in range(2)] + [mc(i, True, "mmlu-all") for i in range(4)]
    out = compare(base, [run], resamples=100)
    assert out["mmlu-circular-accuracy"] == {
        "n": 2.0,
        "diff": 0.0,
        "low": 0.0,
        "high": 0.0,
        "gained": 0.0,
        "lost": 0.0,
        "sign-p": 1.0,
        "gained-per-run": [0.0],
        "lost-per-run": [0.0],
        "sign-p-per-run": [1.0],
        "diff-per-run": [0.0],
        "low-per-run": [0.0],
        "high-per-run": [0.0],
        "confirmed-gain-runs": 0.0,
        "confirmed-loss-runs": 0.0,
    }
    assert out["mmlu-all-circular-accuracy"]["diff"] == 1.0


def test_the_sign_test_is_seed_by_seed_so_an_unchanged_accuracy_shows_no_loss():
    """Two seeds as accurate as the baseline (25 of 100), each keeping 6 of its questions and gaining 19 others, not
    the same 19: each seed gains as many as it loses (p = 1). A consensus of the two would count 19 lost (wrong in
    both) and 0 gained (right in both: none) and call an unchanged accuracy a significant loss."""
    base = [mc(i, i < 25) for i in range(100)]
    runs = [[mc(i, i < 6 or lo <= i < lo + 19) for i in range(100)] for lo in (25, 44)]
    out = compare(base, runs, resamples=500)["mmlu-circular-accuracy"]
    assert out["diff"] == 0.0 and out["low"] < 0 < out["high"]
    assert out["gained-per-run"] == [19.0, 19.0] and out["lost-per-run"] == [19.0, 19.0]
    assert out["sign-p-per-run"] == [1.0, 1.0] and out["sign-p"] == 1.0
    three = compare(base, [runs[0], runs[1], [mc(i, True) for i in range(100)]], resamples=100)
    assert three["mmlu-circular-accuracy"]["sign-p"] == 1.0, "the median run's p: 2 of 3 seeds unchanged"
    assert three["mmlu-circular-accuracy"]["sign-p-per-run"][2] < 1e-6, "the third seed gains 75, loses none"


def test_each_seed_gets_its_own_interval_and_sign_test_and_a_confirmed_count():
    """Issue 38's bar is per seed: a retriever gains in a seed when that seed's own sign test has p < 0.05 and its own
    interval lies above 0. Of three seeds over 60 questions, two move the answer up from rank 5 to rank 1 on 20
    questions (MRR 0.2 -> 1.0), one changes nothing: 2 of 3 confirmed, and MRR, not a 0/1 metric, gets the sign
    test of its paired differences (20 rose, 0 fell)."""
    base = [wq(i, 0.0, 0.0, 5 if i < 20 else None) for i in range(60)]
    up = [wq(i, 0.0, 0.0, 1 if i < 20 else None) for i in range(60)]
    out = compare(base, [up, up, base], resamples=2000)["retrieval-mrr@10"]
    assert out["diff-per-run"] == pytest.approx([0.8 / 3, 0.8 / 3, 0.0])
    assert out["low-per-run"][0] > 0 and out["low-per-run"][2] == out["high-per-run"][2] == 0.0
    assert out["gained-per-run"] == [20.0, 20.0, 0.0] and out["lost-per-run"] == [0.0, 0.0, 0.0]
    assert out["sign-p-per-run"][0] == pytest.approx(2 / 2**20) and out["sign-p-per-run"][2] == 1.0
    assert out["confirmed-gain-runs"] == 2.0 and out["confirmed-loss-runs"] == 0.0
    down = compare(up, [base], resamples=2000)["retrieval-mrr@10"]
    assert down["confirmed-loss-runs"] == 1.0 and down["confirmed-gain-runs"] == 0.0
    few = compare(base[:3] + base[20:], [up[:3] + up[20:]], resamples=2000)["retrieval-mrr@10"]
    assert few["diff"] > 0 and few["sign-p"] > 0.05 and few["confirmed-gain-runs"] == 0.0, "3 of 3: not significant"


def test_gain_share_is_the_ratio_of_mean_gains_with_each_seeds_own_share():
    """The reference (centralized, two seeds) answers questions 0-9 of 20, so it gains 0.5 F1 over a baseline at 0;
    two federated seeds answer 0-3 and 0-5: 0.2 and 0.3, so they keep 50% of the gain, 40% and 60% seed by seed.
    A reference that gains nothing has no share to give."""
    base = [wq(i, 0.0, 0.0, None) for i in range(20)]
    answers = lambda n: [wq(i, float(i < n), float(i < n), None) for i in range(20)]  # noqa: E731
    out = gain_share(base, [answers(10), answers(10)], [answers(4), answers(6)], "wq-f1", resamples=2000)
    assert out["share"] == pytest.approx(0.5) and out["share-per-run"] == pytest.approx([0.4, 0.6])
    assert out["low"] < 0.5 < out["high"] and out["n"] == 20
    assert gain_share(base, [base], [answers(4)], "wq-f1") is None
    rare = gain_share(base, [answers(1)], [answers(1)], "wq-f1", resamples=2000)  # one question carries the gain
    assert rare["share"] == 1.0 and rare["high"] is None, "resamples without that question have no share: open above"
    assert gain_share(base, [answers(10)], [answers(4)], "mmlu-circular-accuracy") is None


def test_the_table_runner_writes_each_rows_paired_comparison(tmp_path):
    from tests.test_experiments import run_table

    base = tmp_path / "base.jsonl"
    tuned = tmp_path / "tuned.jsonl"
    base.write_text("".join(json.dumps(wq(i, 0.0, 0.0, None)) + "\n" for i in range(12)))
    tuned.write_text("".join(json.dumps(wq(i, 1.0, 1.0, 1)) + "\n" for i in range(12)))
    table = {
        "baseline": "untuned",
        "metrics": ["wq-em"],
        "columns": [{"name": "c"}],
        "rows": [{"name": "untuned"}, {"name": "tuned"}],
    }
    results = [{"row": "untuned", "column": "c", "seed": 1}, {"row": "tuned", "column": "c", "seed": 1}]
    paired = run_table.paired_rows(table, results, lambda r: base if r["row"] == "untuned" else tuned)
    assert [p["row"] for p in paired] == ["tuned"] and paired[0]["metrics"]["wq-em"]["gained"] == 12
    assert "| tuned | 1 | +1.000 [+1.000, +1.000] 12/0 p=0.00049 ↑1/1 |" in run_table.summarise_paired(table, paired)
    by_seed = run_table.seed_comparisons(paired, ["wq-em"])  # what results.json carries per cell
    assert by_seed == {
        ("tuned", "c", 1): {
            "wq-em": pytest.approx(dict(diff=1, low=1, high=1, gained=12, lost=0, **{"sign-p": 2 / 4096}))
        }
    }

    half = tmp_path / "half.jsonl"  # a second column that gets half of the first column's gain
    half.write_text("".join(json.dumps(wq(i, float(i < 6), float(i < 6), 1)) + "\n" for i in range(12)))
    table |= {
        "columns": [{"name": "c"}, {"name": "fed"}],
        "gain-share": {"metric": "wq-f1", "row": "tuned", "column": "c"},
    }
    results.append({"row": "tuned", "column": "fed", "seed": 1})
    of = lambda r: base if r["row"] == "untuned" else tuned if r["column"] == "c" else half  # noqa: E731
    paired = run_table.paired_rows(table, results, of)
    assert "gain-share" not in paired[0] and paired[1]["gain-share"]["share"] == pytest.approx(0.5)
    assert paired[1]["gain-share"]["of"] == ["tuned", "c"]
    assert "| tuned | fed | 1 | 50.0% [" in run_table.summarise_paired(table, paired)


def test_reread_summary_pairs_each_adapter_against_untuned_and_measures_the_choices_spread(tmp_path):
    """experiments/reread_adapters.py's summary, on hand-made files: the tuned adapter gets every question of the broad
    set right under circular where the untuned one got half, so its difference is +0.5 with 4 gained, 0 lost; the
    spread column is the median of each question's best minus worst choice score."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "experiments" / "reread_adapters.py"
    spec = importlib.util.spec_from_file_location("reread_adapters", path)
    reread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reread)

    def write(name: str, right: list[bool], spread: float) -> None:
        records, results = [], {}
        for set_name, prefix in (("mmlu", "mmlu-"), ("mmlu-all", "mmlu-all-")):
            for i, ok in enumerate(right):
                scores = [0.0, -spread, -spread / 2, -spread / 4] if ok else [-spread, 0.0, -spread / 2, -spread / 4]
                entry = {"prediction": "A" if ok else "B", "correct": ok, "scores": scores}
                records.append(
                    {"dataset": "mmlu", "set": set_name, "id": f"q{i}", "gold": "A", "circular": entry, "cloze": entry}
                )
            for protocol in reread.PROTOCOLS:
                results[f"{prefix}{protocol}-accuracy"] = sum(right) / len(right)
            results |= {f"{prefix}loglik-pred-{x}": share for x, share in zip("ABCD", (0.5, 0.5, 0.0, 0.0))}
            results[f"{prefix}majority-baseline"] = 1.0
        (tmp_path / f"{name}.json").write_text(json.dumps({"results": results}))
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in records))

    write("untuned", [True, False] * 4, spread=2.0)
    write("tuned", [True] * 8, spread=0.5)
    text = reread.summarise(tmp_path, ["untuned", "tuned"])
    assert text.count("| tuned | 1.000 | 1.000 | 1.000 (+0.500 [+0.125, +0.875] 4/0 p=0.12) |") == 2  # both sets
    assert "| untuned | 2.000 | 2.000 | 2.000 | 2.000 |" in text
    assert "| tuned | 0.500 | 0.500 | 0.500 | 0.500 |" in text
