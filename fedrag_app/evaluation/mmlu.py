"""MMLU under four protocols, and the broad sample across all 57 subjects.

A small model has a favourite answer letter: the untuned SmolLM2-135M answers "C" to 96 (top-1 passage) or 97
(closed-book) of the 100 global_facts questions, and a fine-tuned one may switch to "A". Letter accuracy then
measures that letter's share of the gold answers, not knowledge. So beside the paper's two protocols this module
scores two that carry no letter prior:

- ``loglik``: the letter (' A'..' D') with the highest log-probability after "Answer:" (the paper's protocol);
- ``generate``: the letter parsed from greedy output;
- ``circular``: the choices rotated through the four positions (four prompts); in each rotation the four letters'
  log-probabilities are normalised among themselves, and each choice's score is its mean over the four positions
  it took. A fixed preference for one letter adds the same amount to every choice, so it cancels;
- ``cloze``: no options shown; each choice's text is scored as the answer to the open-question prompt (the one
  Web Questions uses), its log-likelihood divided by its length in characters (lm-eval-harness's acc_norm; how
  SmolLM2's card reports MMLU).

Every report adds the share of each predicted letter (for circular and cloze: the predicted choice's position in
the original order) and the majority-letter baseline of the questions asked: the accuracy of always answering the
most common gold letter.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence

import torch

from fedrag_app.data.loaders import CHOICE_LETTERS, MmluQuestion
from fedrag_app.evaluation.metrics import RunningMean, parse_choice_letter
from fedrag_app.rag.generator import Generator, generate
from fedrag_app.rag.knowledge_store import Hit
from fedrag_app.rag.lm_scoring import logits_after_prefix
from fedrag_app.rag.prompts import build_mmlu_prompt, build_prompt
from fedrag_app.rag.retrieval import prompt_contexts

PROTOCOLS = ("loglik", "generate", "circular", "cloze")

# Hendrycks et al.'s grouping of the 57 subjects (the MMLU repository's categories.py): subject -> category.
_GROUPS = {
    "stem": "abstract_algebra astronomy college_biology college_chemistry college_computer_science college_mathematics "
    "college_physics computer_security conceptual_physics electrical_engineering elementary_mathematics "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_mathematics "
    "high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
    "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
    "professional_law world_religions",
    "social-sciences": "econometrics high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
    "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "other": "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
    "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
CATEGORY = {subject: category for category, names in _GROUPS.items() for subject in names.split()}


def broad_sample(questions: Sequence[MmluQuestion], per_subject: int, seed: int) -> list[MmluQuestion]:
    """A fixed sample of ``per_subject`` questions from each subject (all of a smaller one), subjects in name order;
    the draw depends only on the seed and the subject's questions, so every run and model sees the same ones."""
    by_subject: dict[str, list[MmluQuestion]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    out: list[MmluQuestion] = []
    for subject in sorted(by_subject):
        pool = by_subject[subject]
        out += pool if len(pool) <= per_subject else random.Random(f"mmlu/{seed}/{subject}").sample(pool, per_subject)
    return out


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of ' A'..' D' (after 'Answer:' the letter comes with a leading space)."""
    ids = [tokenizer.encode(f" {letter}", add_special_tokens=False) for letter in CHOICE_LETTERS]
    assert all(len(i) == 1 for i in ids), f"choice letters must be single tokens, got {ids}"
    return [i[0] for i in ids]


def rotated(choices: Sequence[str], r: int) -> list[str]:
    """Rotation r: position p shows choice (p + r) mod 4, so choice j stands at position (j - r) mod 4."""
    n = len(choices)
    return [choices[(p + r) % n] for p in range(n)]


def circular_scores(per_rotation: torch.Tensor) -> torch.Tensor:
    """(N, R, 4) letter log-probs of R rotations -> (N, 4) per choice (original order): each rotation's letters
    normalised among themselves, then each choice's log-probability averaged over the positions it took."""
    n, rotations, width = per_rotation.shape
    normalised = torch.log_softmax(per_rotation, dim=-1)
    out = torch.zeros((n, width))
    for r in range(rotations):
        out += normalised[:, r, [(j - r) % width for j in range(width)]]  # choice j sat at position (j - r) mod 4
    return out / rotations


@torch.no_grad()
def choice_scores(
    gen: Generator, q: MmluQuestion, context: Sequence[str], protocols: Sequence[str]
) -> dict[str, torch.Tensor]:
    """One question's (4,) choice scores under loglik, circular and cloze (those asked for), in one pass: the
    system prompt, passages and question that every prompt starts with run once (lm_scoring.logits_after_prefix),
    then the rotated option lists and the choices' texts as continuations."""
    tok = gen.tokenizer

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    rotations = 4 if "circular" in protocols else 1 if "loglik" in protocols else 0
    mc_rows = [ids(build_mmlu_prompt(tok, q.question, rotated(q.choices, r), context)) for r in range(rotations)]
    cloze_prompt = ids(build_prompt(tok, q.question, context)) if "cloze" in protocols else []
    answers = [ids(str(c).strip() or "-") for c in q.choices] if cloze_prompt else []
    cloze_rows = [cloze_prompt + a for a in answers]
    rows = mc_rows + cloze_rows
    n = min(len(r) for r in rows)  # the tokens every row starts with
    for row in rows[1:]:
        n = min(n, next((i for i, (a, b) in enumerate(zip(rows[0], row)) if a != b), n))
    # every scored position (an option list's last token, the token before a choice's text) stays in a suffix
    n = min([n] + [len(r) - 1 for r in mc_rows] + ([len(cloze_prompt) - 1] if cloze_rows else []))
    groups = []
    if mc_rows:
        groups.append(([r[n:] for r in mc_rows], [[len(r) - 1 - n] for r in mc_rows]))
    if cloze_rows:
        starts = len(cloze_prompt) - 1 - n
        groups.append(([r[n:] for r in cloze_rows], [list(range(starts, len(r) - 1 - n)) for r in cloze_rows]))
    logits = logits_after_prefix(gen.model, rows[0][:n], groups)
    out: dict[str, torch.Tensor] = {}
    if mc_rows:
        letters = letter_token_ids(tok)
        per_rotation = torch.stack([torch.log_softmax(x[0], dim=-1)[letters] for x in logits[0]])  # (R, 4)
        if "loglik" in protocols:
            out["loglik"] = per_rotation[0]  # rotation 0 is the plain prompt
        if "circular" in protocols:
            out["circular"] = circular_scores(per_rotation[None])[0]
    if cloze_rows:
        sums = [
            torch.log_softmax(x, dim=-1)[torch.arange(len(a)), torch.tensor(a)].sum()
            for x, a in zip(logits[-1], answers)
        ]
        chars = torch.tensor([max(1, len(str(c).strip())) for c in q.choices], dtype=torch.float32)
        out["cloze"] = torch.stack(sums).cpu() / chars
    return {k: v.cpu() for k, v in out.items()}


def letter_shares(predicted: Sequence[str | None]) -> dict[str, float]:
    """Share of each letter among the predictions ('none': no letter parsed)."""
    counts = Counter(predicted)
    n = max(1, len(predicted))
    shares = {letter: counts.get(letter, 0) / n for letter in CHOICE_LETTERS}
    if counts.get(None):
        shares["none"] = counts[None] / n
    return shares


def evaluate_mmlu(
    gen: Generator,
    questions: list[MmluQuestion],
    hits: Sequence[Sequence[Hit]] | None = None,
    *,
    protocols: Sequence[str] = ("loglik", "generate"),
    top_k: int = 2,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    prefix: str = "mmlu-",
    records: list[dict] | None = None,
) -> dict[str, float]:
    """Accuracy under each protocol, with its predicted-letter shares, the majority-letter baseline and, when the
    questions span several subjects, accuracy per category. ``records`` (if given) receives one dict per question:
    id, subject, gold, retrieved passage ids and each protocol's prediction and four scores."""
    if unknown := [p for p in protocols if p not in PROTOCOLS]:
        raise ValueError(f"MMLU protocols are {', '.join(PROTOCOLS)}; got {unknown[0]!r}")
    contexts = prompt_contexts(hits, len(questions), top_k)
    tok = gen.tokenizer
    start = time.perf_counter()
    scores: dict[str, torch.Tensor] = {}
    predicted: dict[str, list[str | None]] = {}
    scored = [p for p in ("loglik", "circular", "cloze") if p in protocols]
    if scored:
        was_training = gen.model.training
        gen.model.eval()  # no LoRA dropout
        try:
            per_question = [choice_scores(gen, q, c, scored) for q, c in zip(questions, contexts)]
        finally:
            gen.model.train(was_training)
        scores = {p: torch.stack([s[p] for s in per_question]) for p in scored}
    if "generate" in protocols:
        plain = [build_mmlu_prompt(tok, q.question, q.choices, c) for q, c in zip(questions, contexts)]
        texts = generate(gen, plain, max_new_tokens=max_new_tokens, batch_size=batch_size)
        predicted["generate"] = [parse_choice_letter(t) for t in texts]
    for name, table in scores.items():
        predicted[name] = [CHOICE_LETTERS[i] for i in table.argmax(-1).tolist()]
    seconds_each = (time.perf_counter() - start) / max(1, len(questions))

    gold = Counter(q.answer for q in questions)
    results: dict[str, float] = {
        f"{prefix}majority-baseline": max(gold.values()) / len(questions) if questions else 0.0,
        f"{prefix}n": float(len(questions)),
        f"{prefix}s-per-question": seconds_each,
    }
    several = len({q.subject for q in questions}) > 1
    for name in [p for p in PROTOCOLS if p in predicted]:
        acc = RunningMean()
        by_category: dict[str, RunningMean] = {}
        for q, p in zip(questions, predicted[name]):
            acc.add(float(p == q.answer))
            by_category.setdefault(CATEGORY.get(q.subject, "other"), RunningMean()).add(float(p == q.answer))
        results[f"{prefix}{name}-accuracy"] = acc.value
        results[f"{prefix}{name}-n"] = float(acc.count)
        results |= {f"{prefix}{name}-pred-{k}": v for k, v in letter_shares(predicted[name]).items()}
        if several:
            results |= {f"{prefix}{cat}-{name}-accuracy": m.value for cat, m in sorted(by_category.items())}
    if records is not None:
        for i, q in enumerate(questions):
            row = {
                "dataset": "mmlu",
                "set": prefix.rstrip("-"),  # which evaluated set: 'mmlu' (the first subject), 'mmlu-all', ...
                "id": q.id,
                "subject": q.subject,
                "question": q.question,
                "gold": q.answer,
                "retrieved": [h.id for h in hits[i][:top_k]] if hits is not None else [],
            }
            for name in predicted:
                row[name] = {"prediction": predicted[name][i], "correct": predicted[name][i] == q.answer}
                if name in scores:
                    row[name]["scores"] = [round(float(x), 5) for x in scores[name][i]]
            records.append(row)
    return results
