"""Evaluation metrics, pure functions (docs/ALGORITHMS.md, Evaluation): SQuAD EM/F1, recall@k, MRR, letter parsing,
and their means over a set of questions: the one place answers and retrieved passages are scored (the evaluation
suite, a node's held-out share and federated question answering all call these)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from fedrag_app.data.loaders import CHOICE_LETTERS, QAExample

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


def passage_text(hit: Any) -> str:
    """What answer matching reads of a retrieved passage (a store Hit, a merged federated hit): title and text."""
    return f"{hit.title} {hit.text}"


def answer_ranks(hits: Sequence[Sequence[Any]], examples: Sequence[QAExample], k: int) -> list[int | None]:
    """Per question, the rank of the first top-k passage (title and text) holding a gold answer; None if none does."""
    return [answer_rank([passage_text(h) for h in hs[:k]], e.answers) for hs, e in zip(hits, examples)]


def qa_scores(answer: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, token F1) of one answer, each the best over the gold aliases."""
    return exact_match(answer, golds), token_f1(answer, golds)


def qa_means(scores: Iterable[tuple[float, float]]) -> dict[str, float]:
    """Web Questions EM and F1 over the questions' (EM, F1) pairs, and how many there were."""
    em, f1 = RunningMean(), RunningMean()
    for exact, f1_score in scores:
        em.add(exact)
        f1.add(f1_score)
    return {"wq-em": em.value, "wq-f1": f1.value, "wq-n": float(em.count)}


def retrieval_means(ranks: Iterable[int | None], k: int) -> dict[str, float]:
    """Answer recall@k (a gold answer occurs in a top-k passage) and MRR@k over the questions' answer ranks."""
    recall, mrr = RunningMean(), RunningMean()
    for rank in ranks:
        recall.add(recall_at_k(rank, k))
        mrr.add(reciprocal_rank(rank, k))
    return {f"retrieval-recall@{k}": recall.value, f"retrieval-mrr@{k}": mrr.value, "retrieval-n": float(recall.count)}


def parse_choice_letter(text: str) -> str | None:
    """The first standalone A-D in a generation ('B', 'B.', '(C)', 'Answer: D'); None if there is none."""
    match = _LETTER.search(text.strip())
    return match.group(1) if match else None
