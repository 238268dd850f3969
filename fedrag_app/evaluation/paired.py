"""Is a gain real? Two systems compared question by question on the same questions.

A seed spread says how much training noise moves a figure, not whether the questions asked can tell two systems
apart. Given the per-question records of a baseline and of one or more runs (seeds) of a tuned system (what
``fedrag-app evaluate --predictions`` and the server's ``predictions/round-N.jsonl`` write), each metric gets: the
mean difference, a 95% paired-bootstrap interval of it (questions resampled with replacement; with several seeds,
each question's difference is first averaged over the seeds, and each seed gets its own too), and the questions
gained and lost and the exact two-sided sign test on them (for 0/1 metrics McNemar's exact test; for F1 and MRR the
sign test of the paired differences), seed by seed: McNemar compares two systems that
each answer 0 or 1, and a consensus of seeds is not one (for a metric below 50%, "right in both seeds" is rarer than
"wrong in both", so a majority vote shows losses where every seed's accuracy is unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedrag_app.evaluation.metrics import recall_at_k, reciprocal_rank


def sign_test_p(gained: int, lost: int) -> float:
    """Exact two-sided binomial test of gained vs lost discordant questions (McNemar's exact test)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_interval(diff: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of per-question differences, resampling questions with replacement."""
    if len(diff) == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def question_scores(records: Sequence[dict], recall_k: int = 10) -> dict[str, dict[str, float]]:
    """metric -> {question key -> score}: Web Questions EM, F1, answer recall@k and reciprocal rank@k; MMLU
    correctness under each protocol, per evaluated set ('mmlu' for the first subject, 'mmlu-all', ...)."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        if r["dataset"] == "web_questions":
            key = r["id"]
            out.setdefault("wq-em", {})[key] = float(r["em"])
            out.setdefault("wq-f1", {})[key] = float(r["f1"])
            if "answer_rank" in r:
                rank = r["answer_rank"]
                out.setdefault(f"retrieval-recall@{recall_k}", {})[key] = recall_at_k(rank, recall_k)
                out.setdefault(f"retrieval-mrr@{recall_k}", {})[key] = reciprocal_rank(rank, recall_k)
        elif r["dataset"] == "mmlu":
            for protocol in ("loglik", "generate", "circular", "cloze"):
                if protocol in r:
                    metric = f"{r.get('set', 'mmlu')}-{protocol}-accuracy"
                    out.setdefault(metric, {})[r["id"]] = float(r[protocol]["correct"])
    return out


def compare(
    baseline: Sequence[dict], runs: Sequence[Sequence[dict]], *, recall_k: int = 10, resamples: int = 10_000
) -> dict[str, dict[str, float]]:
    """Per metric, the runs against the baseline on the questions all of them answered: n, mean difference, its
    95% interval (each question averaged over the runs); each run's own difference and interval ('diff-per-run',
    'low-per-run', 'high-per-run'); each run's questions gained / lost (for EM, recall and MMLU correctness: right
    now and wrong before, or the reverse; for F1 and MRR: the score rose or fell) and their exact sign test
    ('gained-per-run', 'lost-per-run', 'sign-p-per-run'), with 'gained' / 'lost' their mean over the runs and
    'sign-p' their median p (one run: its own); and 'confirmed-gain-runs' / 'confirmed-loss-runs', the runs whose
    own sign test has p < 0.05 and whose own interval lies above (below) 0."""
    base = question_scores(baseline, recall_k)
    tuned = [question_scores(r, recall_k) for r in runs]
    out: dict[str, dict[str, float]] = {}
    for metric, base_scores in base.items():
        if not tuned or any(metric not in t for t in tuned):
            continue
        keys = sorted(set(base_scores).intersection(*(t[metric] for t in tuned)))
        if not keys:
            continue
        b = np.array([base_scores[k] for k in keys])
        per_run = np.array([[run[metric][k] for k in keys] for run in tuned])  # (runs, questions)
        t = per_run.mean(axis=0)  # each question over the runs
        low, high = bootstrap_interval(t - b, resamples)
        own = [bootstrap_interval(r - b, resamples) for r in per_run] if len(per_run) > 1 else [(low, high)]
        gained = [int(np.sum(r > b)) for r in per_run]  # a 0/1 metric: right now, wrong before
        lost = [int(np.sum(r < b)) for r in per_run]
        p = [sign_test_p(g, x) for g, x in zip(gained, lost)]
        out[metric] = {
            "n": float(len(keys)),
            "diff": float((t - b).mean()),
            "low": low,
            "high": high,
            "gained": float(np.mean(gained)),
            "lost": float(np.mean(lost)),
            "sign-p": float(np.median(p)),
            "gained-per-run": [float(g) for g in gained],
            "lost-per-run": [float(x) for x in lost],
            "sign-p-per-run": p,
            "diff-per-run": [float((r - b).mean()) for r in per_run],
            "low-per-run": [lo for lo, _ in own],
            "high-per-run": [hi for _, hi in own],
            "confirmed-gain-runs": float(sum(q < 0.05 and lo > 0 for q, (lo, _) in zip(p, own))),
            "confirmed-loss-runs": float(sum(q < 0.05 and hi < 0 for q, (_, hi) in zip(p, own))),
        }
    return out


def gain_share(
    baseline: Sequence[dict],
    reference: Sequence[Sequence[dict]],
    runs: Sequence[Sequence[dict]],
    metric: str,
    *,
    recall_k: int = 10,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float | list[float] | None] | None:
    """How much of a reference system's gain over the baseline the runs keep (a federation's share of centralized
    training's gain), on the questions all of them answered: the ratio of the mean gains, each run's own gain over
    the reference's mean gain, and a 95% interval with questions resampled (one resample for both gains, each
    question averaged over its system's runs). The interval covers which questions were asked, not the seeds'
    spread, which 'share-per-run' shows; 'high' is None (unbounded) when the reference gains nothing in more than
    2.5% of the resamples. None when a system lacks the metric or the reference gains nothing."""
    base = question_scores(baseline, recall_k).get(metric)
    ref = [question_scores(r, recall_k).get(metric) for r in reference]
    tuned = [question_scores(r, recall_k).get(metric) for r in runs]
    if base is None or not ref or not tuned or any(s is None for s in ref + tuned):
        return None
    keys = sorted(set(base).intersection(*ref, *tuned))
    b = np.array([base[k] for k in keys])
    ref_gain = np.array([[s[k] for k in keys] for s in ref]).mean(axis=0) - b  # (questions,)
    per_run = np.array([[s[k] for k in keys] for s in tuned]) - b  # (runs, questions)
    if not keys or ref_gain.mean() <= 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(resamples, len(keys)))
    ref_boot, run_boot = ref_gain[idx].mean(axis=1), per_run.mean(axis=0)[idx].mean(axis=1)
    # a resample where the reference gains nothing has no share: it counts as unbounded above, so when more than
    # 2.5% of them do, the interval is open ('high' None) rather than a number that hides it
    shares = np.where(ref_boot > 0, run_boot / np.where(ref_boot > 0, ref_boot, 1.0), np.inf)
    low, high = np.quantile(shares, 0.025, method="lower"), np.quantile(shares, 0.975, method="higher")
    return {
        "n": float(len(keys)),
        "share": float(per_run.mean() / ref_gain.mean()),
        "low": float(low) if np.isfinite(low) else None,
        "high": float(high) if np.isfinite(high) else None,
        "share-per-run": [float(g.mean() / ref_gain.mean()) for g in per_run],
    }
