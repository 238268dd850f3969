"""Evaluation metrics, pure functions (docs/ALGORITHMS.md, Evaluation): SQuAD EM/F1, recall@k, MRR, letter parsing."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

from fedrag_app.data.loaders import CHOICE_LETTERS

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_LETTER = re.compile(rf"(?:^|[^A-Za-z])\(?([{''.join(CHOICE_LETTERS)}])(?:[).:]|\s|$)")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold alias."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """Best token-level F1 over the gold aliases."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if not pred or not ref:
            best = max(best, float(pred == ref))
        elif common:
            precision, recall = common / len(pred), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


class RunningMean:
    """Mean of a stream, counted from zero items: a running mean of 0 is a mean, not a fresh start."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, value: float) -> float:
        self.total += value
        self.count += 1
        return self.value

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0


def answer_rank(passages: Iterable[str], golds: Sequence[str]) -> int | None:
    """1-based rank of the first passage holding a normalised gold answer, else None."""
    needles = [f" {normalize_answer(g)} " for g in golds if normalize_answer(g)]
    for rank, passage in enumerate(passages, 1):
        hay = f" {normalize_answer(passage)} "
        if any(n in hay for n in needles):
            return rank
    return None


def recall_at_k(rank: int | None, k: int) -> float:
    return float(rank is not None and rank <= k)


def reciprocal_rank(rank: int | None, k: int) -> float:
    return 1.0 / rank if rank is not None and rank <= k else 0.0


def parse_choice_letter(text: str) -> str | None:
    """The first standalone A-D in a generation ('B', 'B.', '(C)', 'Answer: D'); None if there is none."""
    match = _LETTER.search(text.strip())
    return match.group(1) if match else None
