"""LSR's training signal on real questions (issue 21, item 4): is there anything in p_LSR to learn, and can a phase
move the retriever towards it?

    PYTHONPATH=. python benchmarks/lsr_signal.py [--questions 112] [--per-article 8] [--json out.json]

The first Q Web Questions train questions whose Freebase topic has an article in the shared corpus; an embedded
Qdrant store of those articles' first passages, the first 2 passages of articles titled like a gold answer, and
the corpus's first 300 passages as distractors (what a node holds: its own topics, and more); top-4 candidates
with all-MiniLM-L6-v2; log p_LM(answer | passage, question) by SmolLM2-135M-Instruct, scored once (sum and token
count per candidate, so every reduction and beta reads the same forward). One gold answer per question (the
training target). Prints:

1. the entropy of p_LSR (nats, and over log k: 1 = uniform) for sum vs mean and several beta, and how often
   p_LSR's favourite candidate holds a gold answer beside the retriever's first (is the signal right);
2. the entropy of p_R on the same candidates for several tau;
3. for several (lr, top layers, tau, beta), `lsr_steps` (the trainer itself) over the first 3/4 of the
   questions, and before/after: KL(p_LSR || p_R), the p_R and the rank of the LM's favourite, on the trained
   questions and on the held-out last 1/4.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fedrag_app.config.app_config import DataConfig, GeneratorConfig, LsrConfig, RetrieverConfig  # noqa: E402
from fedrag_app.core import environment  # noqa: E402
from fedrag_app.core.torch_runtime import seed_everything, set_threads  # noqa: E402
from fedrag_app.data.loaders import iter_passages, load_web_questions  # noqa: E402
from fedrag_app.evaluation.metrics import answer_rank, passage_text  # noqa: E402
from fedrag_app.rag.generator import load_generator  # noqa: E402
from fedrag_app.rag.ingest import build_shard  # noqa: E402
from fedrag_app.rag.knowledge_store import KnowledgeStore  # noqa: E402
from fedrag_app.rag.retrieval import retrieve
from fedrag_app.rag.retriever import load_retriever  # noqa: E402
from fedrag_app.training.lsr import (
    entropy,
    lm_scores,
    log_distributions,
    lsr_loss,
    lsr_steps,
    retriever_scores,
    scoring_sequences,
)  # noqa: E402

SEED, K = 1234, 4
BETAS = (0.1, 0.25, 0.5, 1.0, 2.0)
TAUS = (0.01, 0.02, 0.05, 0.1)
# (reduction, beta, tau, lr, top layers): the old defaults first, then the candidates
RUNS = (
    ("mean", 1.0, 0.1, 1e-5, 0),
    ("sum", 1.0, 0.1, 1e-4, 0),
    ("sum", 1.0, 0.05, 1e-4, 0),
    ("sum", 1.0, 0.05, 1e-4, 2),
    ("sum", 1.0, 0.05, 3e-4, 2),
    ("sum", 1.0, 0.05, 1e-4, 1),
    ("sum", 0.5, 0.05, 1e-4, 2),
)


def norm_title(text: str) -> str:
    """The corpus's title normalisation (docs/DATA.md; federation/partition.py::title_key)."""
    return re.sub(r"[^a-z0-9_]", "", re.sub(r"[ \-]", "_", text.lower()))


def build_case(questions: int, per_article: int):
    data = DataConfig(dir=environment.data_dir())
    passages = list(iter_passages(data))
    titles = {norm_title(p.title) for p in passages}
    examples = [e for e in load_web_questions("train", data) if e.topic in titles][:questions]
    topics = {e.topic for e in examples}
    answers = {norm_title(a) for e in examples for a in e.answers}
    seen: dict[str, int] = {}
    chosen = []
    for i, p in enumerate(passages):
        t = norm_title(p.title)
        seen[t] = seen.get(t, 0) + 1
        if i < 300 or (t in topics and seen[t] <= per_article) or (t in answers and seen[t] <= 2):
            chosen.append(p)
    return examples, chosen


def score_candidates(gen, examples, hits, cfg: LsrConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) summed answer log-likelihood and (N, k) answer token counts."""
    total = lm_scores(gen, examples, hits, dataclasses.replace(cfg, lm_score="sum"))
    counts = torch.tensor([s.answer_tokens for s in scoring_sequences(gen, examples, hits, cfg)])
    return total, counts.view(total.shape).float()


def holds_answer(hits, examples) -> torch.Tensor:
    """(N, k) bool: the candidate contains a gold answer (evaluate.py's answer-recall test)."""
    return torch.tensor(
        [[answer_rank([passage_text(h)], e.answers) is not None for h in hs] for hs, e in zip(hits, examples)]
    )


def signal_table(sums, counts, hits, examples) -> list[dict]:
    has_answer = holds_answer(hits, examples)
    rows, answerable = [], has_answer.any(-1)
    for reduction, scores in (("sum", sums), ("mean", sums / counts)):
        fav = scores.argmax(-1)
        right = has_answer[torch.arange(len(fav)), fav][answerable].float().mean().item()
        for beta in BETAS:
            h = entropy(torch.log_softmax(scores / beta, -1))
            rows.append(
                {
                    "reduction": reduction,
                    "beta": beta,
                    "entropy": h.mean().item(),
                    "entropy_norm": h.mean().item() / math.log(K),
                    "max_p": torch.softmax(scores / beta, -1).max(-1).values.mean().item(),
                    "favourite_holds_answer": right,
                }
            )
    rows.append(
        {
            "retriever_first_holds_answer": has_answer[:, 0][answerable].float().mean().item(),
            "answerable": answerable.float().mean().item(),
        }
    )
    return rows


@torch.no_grad()
def ranking(retriever, examples, hits, targets, tau, beta) -> dict[str, float]:
    """KL(p_LSR || p_R); the p_R and 1-based rank of the LM's favourite candidate; how often the retriever's first
    candidate holds an answer, of the questions with one among the k (what answer-recall@1 / MRR would see)."""
    scores = torch.cat(
        [retriever_scores(retriever, examples[s : s + 16], hits[s : s + 16]) for s in range(0, len(examples), 16)]
    )
    kl = lsr_loss(scores, targets, retriever_temperature=tau, lm_temperature=beta).item()
    log_p_r, _ = log_distributions(scores, targets, retriever_temperature=tau, lm_temperature=beta)
    fav = targets.argmax(-1)
    p_fav = log_p_r.exp()[torch.arange(len(fav)), fav]
    rank = 1 + (scores > scores[torch.arange(len(fav)), fav].unsqueeze(-1)).sum(-1).float()
    has_answer = holds_answer(hits, examples)
    first = has_answer[torch.arange(len(fav)), scores.argmax(-1)][has_answer.any(-1)].float().mean().item()
    return {"kl": kl, "p_fav": p_fav.mean().item(), "rank_fav": rank.mean().item(), "first_holds_answer": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=112)
    ap.add_argument("--per-article", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2, help="passes over the trained questions per run in part 3")
    ap.add_argument("--json", default="", help="also write everything here")
    args = ap.parse_args()
    set_threads(0)
    seed_everything(SEED)
    t0 = time.perf_counter()
    examples, passages = build_case(args.questions, args.per_article)
    retriever = load_retriever(RetrieverConfig())
    gen = load_generator(GeneratorConfig())
    cfg = LsrConfig(top_k=K)
    with tempfile.TemporaryDirectory() as tmp:
        build_shard(passages, retriever, path=f"{tmp}/shard", progress=False)
        t1 = time.perf_counter()
        with KnowledgeStore.open(path=f"{tmp}/shard") as store:
            hits = retrieve(retriever, store, [e.question for e in examples], K, with_vectors=True)
    sums, counts = score_candidates(gen, examples, hits, cfg)
    t2 = time.perf_counter()
    print(
        f"{len(examples)} questions, {len(passages)} passages, top-{K}; index {t1 - t0:.0f} s (incl. loading), "
        f"LM scoring {t2 - t1:.0f} s"
    )
    rows = signal_table(sums, counts, hits, examples)
    print(
        "\n| lm-score | beta | H(p_LSR) nats | H / log k | mean max p | LM favourite holds an answer |"
        "\n|---|---|---|---|---|---|"
    )
    for r in rows[:-1]:
        print(
            f"| {r['reduction']} | {r['beta']} | {r['entropy']:.3f} | {r['entropy_norm']:.3f} | {r['max_p']:.3f} | "
            f"{r['favourite_holds_answer']:.2f} |"
        )
    print(
        f"\nretriever's first holds an answer: {rows[-1]['retriever_first_holds_answer']:.2f} "
        f"(share of questions with an answer among the {K} candidates: {rows[-1]['answerable']:.2f})"
    )
    stored = torch.tensor([[h.score for h in hs] for hs in hits])
    taus = [{"tau": tau, "entropy": entropy(torch.log_softmax(stored / tau, -1)).mean().item()} for tau in TAUS]
    taus = [r | {"entropy_norm": r["entropy"] / math.log(K)} for r in taus]
    print("\n| tau | H(p_R) nats | H / log k |\n|---|---|---|")
    for r in taus:
        print(f"| {r['tau']} | {r['entropy']:.3f} | {r['entropy_norm']:.3f} |")
    split = len(examples) * 3 // 4
    start_state = {k: v.clone() for k, v in retriever.query_model.state_dict().items()}
    runs = []
    print(
        f"\n| lm-score | beta | tau | lr | top layers | steps | KL train before -> after | p_R(fav) train | "
        f"rank(fav) train | KL held-out | p_R(fav) held-out | rank(fav) held-out | first holds answer: train | "
        f"held-out "
        f"| s |\n|{'---|' * 15}"
    )
    for reduction, beta, tau, lr, layers in RUNS:
        r = load_retriever(RetrieverConfig(train_top_layers=layers))
        r.query_model.load_state_dict(start_state)
        targets = sums if reduction == "sum" else sums / counts
        run_cfg = LsrConfig(
            top_k=K, learning_rate=lr, retriever_temperature=tau, lm_temperature=beta, lm_score=reduction
        )
        parts = {
            "train": (examples[:split], hits[:split], targets[:split]),
            "held": (examples[split:], hits[split:], targets[split:]),
        }
        before = {n: ranking(r, *p, tau, beta) for n, p in parts.items()}
        seed_everything(SEED)
        t = time.perf_counter()
        m = lsr_steps(r, *parts["train"], run_cfg, epochs=args.epochs, seed=SEED)
        seconds = time.perf_counter() - t
        after = {n: ranking(r, *p, tau, beta) for n, p in parts.items()}
        runs.append(
            {
                "lm_score": reduction,
                "beta": beta,
                "tau": tau,
                "lr": lr,
                "top_layers": layers,
                "metrics": m,
                "before": before,
                "after": after,
                "seconds": seconds,
            }
        )
        b, a = before, after
        print(
            f"| {reduction} | {beta} | {tau} | {lr:g} | {layers or 'all'} | {m['lsr-steps']:.0f} | "
            f"{b['train']['kl']:.3f} -> {a['train']['kl']:.3f} | "
            f"{b['train']['p_fav']:.3f} -> {a['train']['p_fav']:.3f} | "
            f"{b['train']['rank_fav']:.2f} -> {a['train']['rank_fav']:.2f} | "
            f"{b['held']['kl']:.3f} -> {a['held']['kl']:.3f} | "
            f"{b['held']['p_fav']:.3f} -> {a['held']['p_fav']:.3f} | "
            f"{b['held']['rank_fav']:.2f} -> {a['held']['rank_fav']:.2f} | "
            f"{b['train']['first_holds_answer']:.2f} -> {a['train']['first_holds_answer']:.2f} | "
            f"{b['held']['first_holds_answer']:.2f} -> {a['held']['first_holds_answer']:.2f} | {seconds:.0f} |"
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "questions": len(examples),
                    "passages": len(passages),
                    "k": K,
                    "targets": rows,
                    "retriever": taus,
                    "runs": runs,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
