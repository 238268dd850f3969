"""The evaluation suite: MMLU (evaluation/mmlu.py's four protocols), Web Questions EM/F1, retrieval recall/MRR.

Deterministic (greedy decoding, file order, a fixed MMLU sample), batched, with or without retrieval and with any
adapter/retriever: baseline and fine-tuned are one command each. Returns flat dicts of scalars (what a round's
metrics carry) and, on request, one record per question (what a paired comparison of two systems needs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.atomic import write_text
from fedrag_app.data.loaders import MmluQuestion, QAExample, load_mmlu, load_web_questions
from fedrag_app.evaluation.metrics import answer_ranks, qa_means, qa_scores, retrieval_means
from fedrag_app.evaluation.mmlu import broad_sample, evaluate_mmlu
from fedrag_app.rag.generator import Generator, generate
from fedrag_app.rag.knowledge_store import Hit, KnowledgeStore
from fedrag_app.rag.prompts import build_prompt
from fedrag_app.rag.retrieval import prompt_contexts, retrieve
from fedrag_app.rag.retriever import DualEncoder


def evaluate_web_questions(
    gen: Generator,
    examples: list[QAExample],
    hits: Sequence[Sequence[Hit]] | None = None,
    *,
    top_k: int = 2,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    records: list[dict] | None = None,
) -> dict[str, float]:
    """Greedy answers scored by exact match and token F1, best over the gold aliases; ``records`` (if given)
    receives one dict per question: id, question, gold answers, answer, EM, F1, retrieved passage ids."""
    contexts = prompt_contexts(hits, len(examples), top_k)
    prompts = [build_prompt(gen.tokenizer, e.question, c) for e, c in zip(examples, contexts)]
    start = time.perf_counter()
    answers = generate(gen, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [qa_scores(a, e.answers) for e, a in zip(examples, answers)]
    for i, (e, a, (exact, f1_score)) in enumerate(zip(examples, answers, scores) if records is not None else ()):
        retrieved = [h.id for h in hits[i]] if hits is not None else []
        records.append(
            {
                "dataset": "web_questions",
                "id": e.id,
                "question": e.question,
                "gold": list(e.answers),
                "answer": a,
                "em": exact,
                "f1": f1_score,
                "retrieved": retrieved,
            }
        )
    return {**qa_means(scores), "wq-s-per-question": (time.perf_counter() - start) / max(1, len(scores))}


def evaluate_retrieval(hits: Sequence[Sequence[Hit]], examples: list[QAExample], k: int) -> dict[str, float]:
    """Answer recall@k (a gold answer occurs in a top-k passage) and MRR@k (metrics.answer_ranks, retrieval_means)."""
    return retrieval_means(answer_ranks(hits, examples, k), k)


def mmlu_questions(cfg: AppConfig, subject: str) -> list[MmluQuestion]:
    """One subject's eval.mmlu-split questions, or for 'all' the fixed broad sample (eval.mmlu-per-subject of each
    of the 57 subjects, drawn with eval.mmlu-sample-seed); the first eval.mmlu-limit of them (0 = all)."""
    ev = cfg.eval
    questions = load_mmlu(cfg.data, subject, ev.mmlu_split)
    if subject == "all":
        questions = broad_sample(questions, ev.mmlu_per_subject, ev.mmlu_sample_seed)
    return questions[: ev.mmlu_limit] if ev.mmlu_limit else questions


def mmlu_prefix(subjects: Sequence[str], subject: str) -> str:
    """Metric prefix: 'mmlu-' for the first subject listed (the names every table and plot know), 'mmlu-<subject>-'
    for each further one (e.g. 'mmlu-all-circular-accuracy')."""
    return "mmlu-" if subject == subjects[0] else f"mmlu-{subject}-"


def run_evaluation(
    cfg: AppConfig,
    gen: Generator,
    retriever: DualEncoder | None = None,
    store: KnowledgeStore | None = None,
    *,
    records: list[dict] | None = None,
) -> dict[str, float]:
    """MMLU (every eval.mmlu-subject, eval.mmlu-protocols) + Web Questions test + retrieval, sized by cfg.eval;
    retrieval once per dataset. ``records`` (if given) receives one dict per question asked."""
    ev = cfg.eval
    use_retrieval = ev.use_retrieval and ev.top_k > 0 and retriever is not None and store is not None
    depth = max(ev.top_k, ev.recall_k)
    start = time.perf_counter()
    results: dict[str, float] = {}
    for subject in ev.mmlu_subject:
        mmlu = mmlu_questions(cfg, subject)
        mmlu_hits = retrieve(retriever, store, [q.question for q in mmlu], ev.top_k) if use_retrieval else None
        results.update(
            evaluate_mmlu(
                gen,
                mmlu,
                mmlu_hits,
                protocols=ev.mmlu_broad_protocols if subject == "all" else ev.mmlu_protocols,
                top_k=ev.top_k,
                batch_size=ev.batch_size,
                prefix=mmlu_prefix(ev.mmlu_subject, subject),
                records=records,
            )
        )
    wq = load_web_questions("test", cfg.data, ev.web_questions_limit)
    wq_hits = retrieve(retriever, store, [e.question for e in wq], depth) if use_retrieval else None
    results.update(
        evaluate_web_questions(
            gen,
            wq,
            wq_hits,
            top_k=ev.top_k,
            batch_size=ev.batch_size,
            max_new_tokens=cfg.generator.max_new_tokens,
            records=records,
        )
    )
    if use_retrieval:
        results.update(evaluate_retrieval(wq_hits, wq, ev.recall_k))
        if records is not None:
            wq_records = [r for r in records if r["dataset"] == "web_questions"][-len(wq) :]
            for record, rank in zip(wq_records, answer_ranks(wq_hits, wq, ev.recall_k)):
                record["answer_rank"] = rank
    results["eval-retrieval"] = float(use_retrieval)
    results["eval-seconds"] = time.perf_counter() - start
    return results


def write_predictions(path, records: list[dict]) -> None:
    """One JSON line per question asked (MMLU and Web Questions), written atomically: what a paired comparison of
    two systems on the same questions reads (fedrag_app/evaluation/paired.py)."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def format_table(results: dict[str, float]) -> str:
    """A plain two-column table, one metric per line."""
    width = max(len(k) for k in results)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in results.items():
        shown = f"{value:.0f}" if key.endswith("-n") else f"{value:.4f}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
