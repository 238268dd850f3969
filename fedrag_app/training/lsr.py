"""LSR: LM-supervised retrieval, training the query encoder towards the passages the generator finds useful.

p_R(c|x)   = softmax_c(<E_q(x), E_c(c)> / τ)                      with gradient through the query encoder
p_LSR(c|x) = softmax_c(log p_LM(y | prompt(c, x)) / β)            under no_grad, all k passages in one forward
             (y = the answer tokens; the end-of-turn token is not scored: a small chat model that would go on
             "Paris is the capital…" after a supporting passage must not be punished for it)
loss       = KL(p_LSR ‖ p_R) (REPLUG/Atlas), or KL(p_R ‖ p_LSR) (RA-DIT's writing) — named in lsr.kl-direction.

The retrieval scores come out of the query encoder's forward pass, so the gradient reaches it. The LM scores are
log-likelihoods: probabilities of a whole answer underflow to 0, and their softmax would be a uniform target.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from fedrag_app.config.app_config import LsrConfig
from fedrag_app.data.loaders import QAExample
from fedrag_app.rag.generator import Generator, scoring_adapter
from fedrag_app.rag.knowledge_store import Hit, KnowledgeStore
from fedrag_app.rag.lm_scoring import answer_logprobs
from fedrag_app.rag.prompts import format_passage
from fedrag_app.rag.retrieval import retrieve
from fedrag_app.rag.retriever import DualEncoder
from fedrag_app.training.optimizer_state import OptimizerState, keep_optimizer, restore_optimizer
from fedrag_app.training.ralt import StepCallback
from fedrag_app.training.score_cache import ScoreCache, generator_fingerprint, sequence_key
from fedrag_app.training.sequences import build_sequence, collate

# each share a node's LSR phase reports -> the count it is a share of. Across nodes a share is pooled by that count
# (pooled_shares), not averaged by the FedAvg weight: in an LSR round the weight is lsr-examples, the questions the
# gate kept, so a node that kept more would count more in its own keep rate, and one that kept none not at all.
SHARES = {"lsr-candidates-kept": "lsr-questions", "lsr-gate-kept": "lsr-gate-asked", "lsr-scores-cached": "lsr-scored"}


def pooled_shares(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each of SHARES over the nodes that reported it with its count: sum(share x count) / sum(count)."""
    pooled = {}
    for share, count in SHARES.items():
        pairs = [(float(r[share]), float(r[count])) for r in rows if share in r and count in r]
        if (total := sum(n for _, n in pairs)) > 0:
            pooled[share] = sum(v * n for v, n in pairs) / total
    return pooled


def log_distributions(
    retriever_scores: torch.Tensor, lm_scores: torch.Tensor, *, retriever_temperature: float, lm_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_R, log p_LSR), each (B, k); p_LSR is a fixed target (no gradient)."""
    log_p_r = F.log_softmax(retriever_scores / retriever_temperature, dim=-1)
    log_p_lsr = F.log_softmax(lm_scores.detach() / lm_temperature, dim=-1)
    return log_p_r, log_p_lsr


def lsr_loss(
    retriever_scores: torch.Tensor,
    lm_scores: torch.Tensor,
    *,
    retriever_temperature: float,
    lm_temperature: float,
    kl_direction: str = "lsr-retriever",
) -> torch.Tensor:
    """Mean over the batch of KL between p_LSR and p_R; both inputs (B, k)."""
    log_p_r, log_p_lsr = log_distributions(
        retriever_scores, lm_scores, retriever_temperature=retriever_temperature, lm_temperature=lm_temperature
    )
    if kl_direction == "lsr-retriever":  # KL(p_LSR || p_R)
        kl = (log_p_lsr.exp() * (log_p_lsr - log_p_r)).sum(-1)
    elif kl_direction == "retriever-lsr":  # KL(p_R || p_LSR)
        kl = (log_p_r.exp() * (log_p_r - log_p_lsr)).sum(-1)
    else:
        raise ValueError(f"kl_direction must be 'lsr-retriever' or 'retriever-lsr', got {kl_direction!r}")
    return kl.mean()


def scoring_sequences(gen: Generator, examples: list[QAExample], hits: list[list[Hit]], cfg: LsrConfig) -> list:
    """The B·k sequences (passage, question -> answer without end-of-turn), example-major."""
    return [
        build_sequence(
            gen.tokenizer, ex.question, format_passage(h.title, h.text), ex.target, cfg.max_seq_len, label_eos=False
        )
        for ex, ex_hits in zip(examples, hits)
        for h in ex_hits
    ]


@torch.no_grad()
def lm_scores(
    gen: Generator, examples: list[QAExample], hits: list[list[Hit]], cfg: LsrConfig, *, cache: ScoreCache | None = None
) -> torch.Tensor:
    """(B, k) log p_LM(answer | passage, question): LSR's targets, fixed during a phase."""
    seqs = scoring_sequences(gen, examples, hits, cfg)
    k = len(seqs) // max(1, len(examples))
    return sequence_scores(gen, seqs, cfg, per_forward=cfg.batch_size * max(1, k), cache=cache).view(len(examples), k)


@torch.no_grad()
def closed_book_scores(
    gen: Generator, examples: list[QAExample], cfg: LsrConfig, *, cache: ScoreCache | None = None
) -> torch.Tensor:
    """(B,) log p_LM(answer | question) with no passage, on the scale of lm_scores (lsr.lm-score)."""
    seqs = [
        build_sequence(gen.tokenizer, ex.question, None, ex.target, cfg.max_seq_len, label_eos=False) for ex in examples
    ]
    return sequence_scores(gen, seqs, cfg, per_forward=cfg.batch_size * cfg.top_k, cache=cache)


def sequence_scores(
    gen: Generator, seqs: list, cfg: LsrConfig, *, per_forward: int, cache: ScoreCache | None = None
) -> torch.Tensor:
    """(N,) each sequence's answer log-likelihood, summed or averaged per token (lsr.lm-score).

    Sorted by length and scored ``per_forward`` per no-grad forward, so that little of it is padding; the system
    prompt they all start with runs once per forward (lm_scoring's shared prefix). With a ``cache`` (a frozen
    generator) only sequences it has never scored go through the model."""
    totals = torch.zeros(len(seqs))
    counts = torch.tensor([s.answer_tokens for s in seqs], dtype=torch.float32)
    keys: list[str] = []
    if cache is not None:
        fingerprint = generator_fingerprint(gen)
        keys = [sequence_key(fingerprint, s.input_ids, s.labels) for s in seqs]
        known = cache.get_many(keys)
        for i, key in enumerate(keys):
            if key in known:
                totals[i] = known[key][0]
        todo = [i for i, key in enumerate(keys) if key not in known]
    else:
        todo = list(range(len(seqs)))
    todo.sort(key=lambda i: len(seqs[i].input_ids))
    was_training = gen.model.training
    gen.model.eval()  # no dropout in the supervision signal
    try:
        for start in range(0, len(todo), per_forward):
            idx = todo[start : start + per_forward]
            inputs = collate([seqs[i] for i in idx], gen.tokenizer.pad_token_id, gen.device)
            totals[idx] = answer_logprobs(gen.model, **inputs, reduction="sum", share_prefix=True).float().cpu()
    finally:
        gen.model.train(was_training)
    if cache is not None and todo:
        cache.put_many({keys[i]: (totals[i].item(), int(counts[i])) for i in todo})
    return totals if cfg.lm_score == "sum" else totals / counts.clamp(min=1)


def retriever_scores(
    retriever: DualEncoder, examples: list[QAExample], hits: list[list[Hit]], *, cross: bool = False
) -> torch.Tensor:
    """(B, k) cosine scores with gradient into the trainable encoder(s); ``cross``: (B, B·k), every question against
    every candidate of the batch (row b's own are columns b·k .. b·k + k − 1)."""
    queries = retriever.encode_queries([e.question for e in examples], grad=True)  # (B, D)
    k = len(hits[0])
    if retriever.train_context:
        texts = [format_passage(h.title, h.text) for ex_hits in hits for h in ex_hits]
        contexts = retriever.encode_passages(texts, grad=True).view(len(examples), k, -1)  # (B, k, D)
    else:  # the frozen context encoder's embeddings, as stored in the index
        contexts = torch.from_numpy(np.stack([np.stack([h.vector for h in ex_hits]) for ex_hits in hits])).to(queries)
    if cross:
        return queries @ contexts.reshape(-1, contexts.shape[-1]).T  # (B, B·k)
    return torch.einsum("bd,bkd->bk", queries, contexts)  # (B, k)


def shared_candidates(hits: list[list[Hit]]) -> torch.Tensor:
    """(B, B·k) True where another question's candidate is not a negative for this question: one of its own
    passages, or a passage already counted once (two other questions retrieving it must not push it down twice)."""
    k = len(hits[0])
    flat = [h.id for ex_hits in hits for h in ex_hits]
    own = [{h.id for h in ex_hits} for ex_hits in hits]
    first: dict[str, int] = {}
    for j, pid in enumerate(flat):
        first.setdefault(pid, j)
    return torch.tensor(
        [[j // k != b and (pid in own[b] or first[pid] != j) for j, pid in enumerate(flat)] for b in range(len(hits))]
    )


def in_batch_lsr_loss(
    cross_scores: torch.Tensor,
    lm_scores: torch.Tensor,
    shared: torch.Tensor,
    *,
    retriever_temperature: float,
    lm_temperature: float,
) -> torch.Tensor:
    """KL(p_LSR || p_R) with the batch's other candidates as negatives (lsr.in-batch-negatives): p_R is a softmax over
    all B·k candidates (those ``shared`` with the question's own left out), p_LSR puts its mass on the question's own
    k as before and none on the rest, so the loss also pushes the other questions' passages down. One question (B = 1)
    is lsr_loss exactly."""
    b, k = lm_scores.shape
    logits = (cross_scores / retriever_temperature).masked_fill(shared, float("-inf"))  # (B, B·k)
    log_p_r = F.log_softmax(logits, dim=-1).view(b, b, k)[torch.arange(b), torch.arange(b)]  # (B, k): own columns
    log_p_lsr = F.log_softmax(lm_scores.detach() / lm_temperature, dim=-1)
    return (log_p_lsr.exp() * (log_p_lsr - log_p_r)).sum(-1).mean()


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    """(B,) entropy in nats of each row of a (B, k) log-distribution."""
    return -(log_p.exp() * log_p).sum(-1)


ARTICLE_DEPTH = 4  # lsr.one-per-article retrieves this many times k, then keeps each article's best passage


def candidates(retriever: DualEncoder, store: KnowledgeStore, questions: list[str], cfg: LsrConfig) -> list[list[Hit]]:
    """The k passages LSR ranks for each question: the retriever's top k, or with ``lsr.one-per-article`` the top k
    of distinct articles (titles), each article's best passage, from the top ARTICLE_DEPTH·k."""
    if not cfg.one_per_article:
        return retrieve(retriever, store, questions, cfg.top_k, with_vectors=True)
    deeper = retrieve(retriever, store, questions, cfg.top_k * ARTICLE_DEPTH, with_vectors=True)
    out = []
    for hits in deeper:
        best: dict[str, Hit] = {}
        for h in hits:  # best first
            best.setdefault(h.title, h)
        out.append(list(best.values())[: cfg.top_k])
    return out


def train_lsr(
    gen: Generator,
    retriever: DualEncoder,
    store: KnowledgeStore,
    examples: list[QAExample],
    cfg: LsrConfig,
    *,
    epochs: int = 1,
    max_steps: int = 0,
    seed: int = 0,
    on_step: StepCallback | None = None,
    cache: ScoreCache | None = None,
    optimizer_state: OptimizerState | None = None,
) -> dict[str, float]:
    """One LSR phase: candidates and LM scores once (both fixed during the phase), then AdamW on the retriever.
    ``cache``: reuse LM scores of a frozen generator (train.mode = lsr; score_cache.py)."""
    start = time.perf_counter()
    given = len(examples)
    hits = candidates(retriever, store, [e.question for e in examples], cfg)
    keep = [i for i, h in enumerate(hits) if len(h) == cfg.top_k]  # a store smaller than k cannot rank k
    examples, hits = [examples[i] for i in keep], [hits[i] for i in keep]
    hits_before = cache.hits if cache is not None else 0
    asked = len(examples)
    with scoring_adapter(gen, cfg.scorer_adapter) as scorer:  # lsr.scorer-adapter: a generator that reads
        targets = lm_scores(scorer, examples, hits, cfg, cache=cache) if examples else torch.zeros(0, cfg.top_k)
        scored = targets.numel() + (len(examples) if cfg.gate else 0)  # sequences asked of the LM (or its cache)
        if cfg.gate and examples:  # only where reading one of the candidates helps the LM: a signal about passages
            closed_book = closed_book_scores(scorer, examples, cfg, cache=cache)
            keep = (targets.max(dim=1).values > closed_book + cfg.gate_margin).tolist()
            examples, hits = [e for e, k in zip(examples, keep) if k], [h for h, k in zip(hits, keep) if k]
            targets = targets[torch.tensor(keep, dtype=torch.bool)]
    scoring_seconds = time.perf_counter() - start
    metrics = lsr_steps(
        retriever,
        examples,
        hits,
        targets,
        cfg,
        epochs=epochs,
        max_steps=max_steps,
        seed=seed,
        on_step=on_step,
        optimizer_state=optimizer_state,
    )
    cached = (cache.hits - hits_before) / max(1, scored) if cache is not None else 0.0
    return metrics | {
        "lsr-candidates-kept": asked / max(1, given),  # questions with k candidates (k articles with one-per-article)
        "lsr-gate-kept": len(examples) / max(1, asked),
        "lsr-examples": float(len(examples)),  # the questions the retriever learned from: its FedAvg weight
        "lsr-scores-cached": cached,
        "lsr-questions": float(given),  # the counts the three shares above are shares of (SHARES)
        "lsr-gate-asked": float(asked),
        "lsr-scored": float(scored),
        "lsr-scoring-seconds": scoring_seconds,
        "lsr-seconds": time.perf_counter() - start,
    }


def lsr_steps(
    retriever: DualEncoder,
    examples: list[QAExample],
    hits: list[list[Hit]],
    targets: torch.Tensor,
    cfg: LsrConfig,
    *,
    epochs: int = 1,
    max_steps: int = 0,
    seed: int = 0,
    on_step: StepCallback | None = None,
    optimizer_state: OptimizerState | None = None,
) -> dict[str, float]:
    """AdamW on the retriever towards fixed LM scores ``targets`` (N, k) of the candidates ``hits``.

    Metrics say whether there was anything to learn: the target's entropy (nats, and over log k: 1 = uniform,
    nothing to learn), the retriever's own entropy on the candidates at the start (from the store's scores), and
    KL(p_LSR || p_R) of each step's batch before the step (first / last / mean), whatever the loss direction."""
    rng = random.Random(seed)
    batches = [list(range(s, min(s + cfg.batch_size, len(examples)))) for s in range(0, len(examples), cfg.batch_size)]
    optimizer = torch.optim.AdamW(retriever.trainable_parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    restore_optimizer(optimizer, optimizer_state)  # train.keep-optimizer-state: continue the last round's AdamW
    losses: list[float] = []
    kls: list[float] = []
    temps = dict(retriever_temperature=cfg.retriever_temperature, lm_temperature=cfg.lm_temperature)
    retriever.query_model.train()
    try:
        for _ in range(epochs):
            rng.shuffle(batches)
            for b in batches:
                batch_hits = [hits[i] for i in b]
                if cfg.in_batch_negatives:
                    cross = retriever_scores(retriever, [examples[i] for i in b], batch_hits, cross=True)
                    n = len(b)
                    scores = cross.view(n, n, -1)[torch.arange(n), torch.arange(n)]  # (B, k): own candidates
                    target = targets[b].to(scores)
                    loss = in_batch_lsr_loss(cross, target, shared_candidates(batch_hits), **temps)
                else:
                    scores = retriever_scores(retriever, [examples[i] for i in b], batch_hits)
                    target = targets[b].to(scores)
                    loss = lsr_loss(scores, target, kl_direction=cfg.kl_direction, **temps)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                kls.append(lsr_loss(scores.detach(), target, kl_direction="lsr-retriever", **temps).item())
                if on_step is not None:
                    on_step(len(losses), losses[-1], None)
                if max_steps and len(losses) >= max_steps:
                    break
            if max_steps and len(losses) >= max_steps:
                break
    finally:
        retriever.query_model.eval()
    keep_optimizer(optimizer, optimizer_state)  # handed back in place, for the next round
    stored = torch.tensor([[h.score for h in ex_hits] for ex_hits in hits]).view(len(hits), cfg.top_k)  # (N, k)
    log_p_r, log_p_lsr = log_distributions(stored, targets, **temps)
    log_k = math.log(cfg.top_k)
    target_entropy = entropy(log_p_lsr).mean().item() if len(hits) else 0.0
    return {
        "lsr-loss-first": losses[0] if losses else 0.0,
        "lsr-loss-last": losses[-1] if losses else 0.0,
        "lsr-loss-mean": sum(losses) / len(losses) if losses else 0.0,
        "lsr-kl-first": kls[0] if kls else 0.0,
        "lsr-kl-last": kls[-1] if kls else 0.0,
        "lsr-kl-mean": sum(kls) / len(kls) if kls else 0.0,
        "lsr-target-entropy": target_entropy,
        "lsr-target-entropy-norm": target_entropy / log_k,
        "lsr-retriever-entropy": entropy(log_p_r).mean().item() if len(hits) else 0.0,
        "lsr-steps": float(len(losses)),
        "lsr-needs-reindex": float(retriever.train_context and bool(losses)),
    }
