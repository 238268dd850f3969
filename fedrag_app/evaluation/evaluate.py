"""The evaluation suite: MMLU (letter log-likelihood and generation), Web Questions EM/F1, retrieval recall/MRR.

Deterministic (greedy decoding, file order), batched, with or without retrieval and with any adapter/retriever:
baseline and fine-tuned are one command each. Returns flat dicts of scalars (what a round's metrics carry).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from fedrag_app.config.app_config import AppConfig
from fedrag_app.data.loaders import CHOICE_LETTERS, MmluQuestion, QAExample, load_mmlu, load_web_questions
from fedrag_app.evaluation.metrics import (
    RunningMean,
    answer_rank,
    exact_match,
    parse_choice_letter,
    recall_at_k,
    reciprocal_rank,
    token_f1,
)
from fedrag_app.rag.generator import Generator, generate, generate_scored
from fedrag_app.rag.knowledge_store import Hit, KnowledgeStore
from fedrag_app.rag.prompts import build_mmlu_prompt, build_prompt, format_passage
from fedrag_app.rag.retrieval import retrieve
from fedrag_app.rag.retriever import DualEncoder


def _contexts(hits: Sequence[Sequence[Hit]] | None, n: int, k: int) -> list[list[str]]:
    if hits is None:
        return [[] for _ in range(n)]
    return [[format_passage(h.title, h.text) for h in hs[:k]] for hs in hits]


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of ' A'..' D' (after 'Answer:' the letter comes with a leading space)."""
    ids = [tokenizer.encode(f" {letter}", add_special_tokens=False) for letter in CHOICE_LETTERS]
    assert all(len(i) == 1 for i in ids), f"choice letters must be single tokens, got {ids}"
    return [i[0] for i in ids]


@torch.no_grad()
def mmlu_letter_logprobs(gen: Generator, prompts: list[str], batch_size: int = 8) -> torch.Tensor:
    """(N, 4) log-probabilities of the next token being ' A'..' D' after each prompt; left-padded batches.

    Position ids come from the attention mask (each prompt starts at position 0 after its padding), as generation
    sets them: without them a left-padded prompt is shifted, which only relative-position (RoPE) models ignore."""
    tok, letters, rows = gen.tokenizer, letter_token_ids(gen.tokenizer), []
    old_side, tok.padding_side = tok.padding_side, "left"
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tok(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(gen.device)
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = gen.model(**enc, position_ids=positions).logits[:, -1].float()  # (b, V): each prompt ends last
            rows.append(torch.log_softmax(logits, dim=-1)[:, letters].cpu())
    finally:
        tok.padding_side = old_side
    return torch.cat(rows)


def evaluate_mmlu(
    gen: Generator,
    questions: list[MmluQuestion],
    hits: Sequence[Sequence[Hit]] | None = None,
    *,
    protocol: str = "loglik",
    top_k: int = 2,
    batch_size: int = 8,
    max_new_tokens: int = 8,
) -> dict[str, float]:
    """Accuracy by choice-letter log-likelihood ('loglik'), by the letter parsed from greedy output ('generate'),
    or both ('both': one generation pass whose first step gives the letter log-likelihoods)."""
    if protocol not in ("loglik", "generate", "both"):
        raise ValueError(f"protocol must be 'loglik', 'generate' or 'both', got {protocol!r}")
    contexts = _contexts(hits, len(questions), top_k)
    prompts = [build_mmlu_prompt(gen.tokenizer, q.question, q.choices, c) for q, c in zip(questions, contexts)]
    start = time.perf_counter()
    predicted: dict[str, list[str]] = {}
    if protocol == "loglik":
        predicted["loglik"] = _argmax_letters(mmlu_letter_logprobs(gen, prompts, batch_size))
    else:
        letters = letter_token_ids(gen.tokenizer) if protocol == "both" else None
        texts, logprobs = generate_scored(
            gen, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, first_token_ids=letters
        )
        predicted["generate"] = [parse_choice_letter(t) for t in texts]
        if logprobs is not None:
            predicted["loglik"] = _argmax_letters(logprobs)
    seconds_each = (time.perf_counter() - start) / max(1, len(questions))
    results: dict[str, float] = {}
    for name in sorted(predicted):
        acc = RunningMean()
        for q, p in zip(questions, predicted[name]):
            acc.add(float(p == q.answer))
        results |= {
            f"mmlu-{name}-accuracy": acc.value,
            f"mmlu-{name}-n": float(acc.count),
            f"mmlu-{name}-s-per-question": seconds_each,
        }  # 'both': the shared pass's time, in each
    return results


def _argmax_letters(logprobs: torch.Tensor) -> list[str]:
    return [CHOICE_LETTERS[i] for i in logprobs.argmax(-1).tolist()]


def evaluate_web_questions(
    gen: Generator,
    examples: list[QAExample],
    hits: Sequence[Sequence[Hit]] | None = None,
    *,
    top_k: int = 2,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> dict[str, float]:
    """Greedy answers scored by exact match and token F1, best over the gold aliases."""
    contexts = _contexts(hits, len(examples), top_k)
    prompts = [build_prompt(gen.tokenizer, e.question, c) for e, c in zip(examples, contexts)]
    start = time.perf_counter()
    answers = generate(gen, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    em, f1 = RunningMean(), RunningMean()
    for e, a in zip(examples, answers):
        em.add(exact_match(a, e.answers))
        f1.add(token_f1(a, e.answers))
    return {
        "wq-em": em.value,
        "wq-f1": f1.value,
        "wq-n": float(em.count),
        "wq-s-per-question": (time.perf_counter() - start) / max(1, em.count),
    }


def answer_ranks(hits: Sequence[Sequence[Hit]], examples: list[QAExample], k: int) -> list[int | None]:
    """Per question, the rank of the first top-k passage (title and text) holding a gold answer; None if none does."""
    return [answer_rank([f"{h.title} {h.text}" for h in hs[:k]], e.answers) for hs, e in zip(hits, examples)]


def evaluate_retrieval(hits: Sequence[Sequence[Hit]], examples: list[QAExample], k: int) -> dict[str, float]:
    """Answer recall@k (a gold answer occurs in a top-k passage) and MRR@k."""
    recall, mrr = RunningMean(), RunningMean()
    for rank in answer_ranks(hits, examples, k):
        recall.add(recall_at_k(rank, k))
        mrr.add(reciprocal_rank(rank, k))
    return {f"retrieval-recall@{k}": recall.value, f"retrieval-mrr@{k}": mrr.value, "retrieval-n": float(recall.count)}


def run_evaluation(
    cfg: AppConfig, gen: Generator, retriever: DualEncoder | None = None, store: KnowledgeStore | None = None
) -> dict[str, float]:
    """MMLU (both protocols) + Web Questions test + retrieval, sized by cfg.eval; retrieval once per dataset."""
    ev = cfg.eval
    use_retrieval = ev.use_retrieval and ev.top_k > 0 and retriever is not None and store is not None
    depth = max(ev.top_k, ev.recall_k)
    start = time.perf_counter()
    results: dict[str, float] = {}
    mmlu = load_mmlu(cfg.data, ev.mmlu_subject, ev.mmlu_split, ev.mmlu_limit)
    mmlu_hits = retrieve(retriever, store, [q.question for q in mmlu], ev.top_k) if use_retrieval else None
    results.update(evaluate_mmlu(gen, mmlu, mmlu_hits, protocol="both", top_k=ev.top_k, batch_size=ev.batch_size))
    wq = load_web_questions("test", cfg.data, ev.web_questions_limit)
    wq_hits = retrieve(retriever, store, [e.question for e in wq], depth) if use_retrieval else None
    results.update(
        evaluate_web_questions(
            gen, wq, wq_hits, top_k=ev.top_k, batch_size=ev.batch_size, max_new_tokens=cfg.generator.max_new_tokens
        )
    )
    if use_retrieval:
        results.update(evaluate_retrieval(wq_hits, wq, ev.recall_k))
    results["eval-retrieval"] = float(use_retrieval)
    results["eval-seconds"] = time.perf_counter() - start
    return results


def format_table(results: dict[str, float]) -> str:
    """A plain two-column table, one metric per line."""
    width = max(len(k) for k in results)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in results.items():
        shown = f"{value:.0f}" if key.endswith("-n") else f"{value:.4f}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
