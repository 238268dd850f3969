"""LSR: LM-supervised retrieval, training the query encoder towards the passages the generator finds useful.

p_R(c|x)   = softmax_c(<E_q(x), E_c(c)> / τ)                      with gradient through the query encoder
p_LSR(c|x) = softmax_c(log p_LM(y | prompt(c, x)) / β)            under no_grad, all k passages in one forward
             (y = the answer tokens; the end-of-turn token is not scored: a small chat model that would go on
             "Paris is the capital…" after a supporting passage must not be punished for it)
loss       = KL(p_LSR ‖ p_R) (REPLUG/Atlas), or KL(p_R ‖ p_LSR) (RA-DIT's writing) — named in lsr.kl-direction.

FedRAG builds its retrieval scores as a fresh leaf tensor from floats, so its retriever never moves; here the
scores come out of the query encoder's forward pass. The LM scores are log-likelihoods (FedRAG softmaxes raw
probabilities that underflow to 0, giving a uniform target).
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from fedrag_app.config import LsrConfig
from fedrag_app.data import QAExample
from fedrag_app.generator import Generator
from fedrag_app.knowledge_store import Hit, KnowledgeStore
from fedrag_app.lm_scoring import answer_logprobs
from fedrag_app.optimizer_state import OptimizerState, keep_optimizer, restore_optimizer
from fedrag_app.prompts import format_passage
from fedrag_app.ralt import StepCallback, build_sequence, collate, retrieve
from fedrag_app.retriever import DualEncoder


def log_distributions(retriever_scores: torch.Tensor, lm_scores: torch.Tensor, *, retriever_temperature: float,
                      lm_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_R, log p_LSR), each (B, k); p_LSR is a fixed target (no gradient)."""
    log_p_r = F.log_softmax(retriever_scores / retriever_temperature, dim=-1)
    log_p_lsr = F.log_softmax(lm_scores.detach() / lm_temperature, dim=-1)
    return log_p_r, log_p_lsr


def lsr_loss(retriever_scores: torch.Tensor, lm_scores: torch.Tensor, *, retriever_temperature: float,
             lm_temperature: float, kl_direction: str = "lsr-retriever") -> torch.Tensor:
    """Mean over the batch of KL between p_LSR and p_R; both inputs (B, k)."""
    log_p_r, log_p_lsr = log_distributions(retriever_scores, lm_scores, retriever_temperature=retriever_temperature,
                                           lm_temperature=lm_temperature)
    if kl_direction == "lsr-retriever":  # KL(p_LSR || p_R)
        kl = (log_p_lsr.exp() * (log_p_lsr - log_p_r)).sum(-1)
    elif kl_direction == "retriever-lsr":  # KL(p_R || p_LSR)
        kl = (log_p_r.exp() * (log_p_r - log_p_lsr)).sum(-1)
    else:
        raise ValueError(f"kl_direction must be 'lsr-retriever' or 'retriever-lsr', got {kl_direction!r}")
    return kl.mean()


def scoring_sequences(gen: Generator, examples: list[QAExample], hits: list[list[Hit]], cfg: LsrConfig) -> list:
    """The B·k sequences (passage, question -> answer without end-of-turn), example-major."""
    return [build_sequence(gen.tokenizer, ex.question, format_passage(h.title, h.text), ex.target, cfg.max_seq_len,
                           label_eos=False)
            for ex, ex_hits in zip(examples, hits) for h in ex_hits]


@torch.no_grad()
def lm_scores(gen: Generator, examples: list[QAExample], hits: list[list[Hit]], cfg: LsrConfig) -> torch.Tensor:
    """(B, k) log p_LM(answer | passage, question): LSR's targets, fixed during a phase.

    All k candidates of a question go through one batched forward; questions are grouped by length
    (cfg.batch_size questions per forward) so that little of it is padding."""
    seqs = scoring_sequences(gen, examples, hits, cfg)
    k = len(seqs) // max(1, len(examples))
    groups = sorted(range(len(examples)), key=lambda q: max(len(s.input_ids) for s in seqs[q * k : (q + 1) * k]))
    out = torch.zeros(len(seqs))
    was_training = gen.model.training
    gen.model.eval()  # no dropout in the supervision signal
    try:
        for start in range(0, len(groups), cfg.batch_size):
            idx = [q * k + j for q in groups[start : start + cfg.batch_size] for j in range(k)]
            inputs = collate([seqs[i] for i in idx], gen.tokenizer.pad_token_id, gen.device)
            out[idx] = answer_logprobs(gen.model, **inputs, reduction=cfg.lm_score).float().cpu()
    finally:
        gen.model.train(was_training)
    return out.view(len(examples), k)


def retriever_scores(retriever: DualEncoder, examples: list[QAExample], hits: list[list[Hit]]) -> torch.Tensor:
    """(B, k) cosine scores with gradient into the trainable encoder(s)."""
    queries = retriever.encode_queries([e.question for e in examples], grad=True)  # (B, D)
    k = len(hits[0])
    if retriever.train_context:
        texts = [format_passage(h.title, h.text) for ex_hits in hits for h in ex_hits]
        contexts = retriever.encode_passages(texts, grad=True).view(len(examples), k, -1)  # (B, k, D)
    else:  # the frozen context encoder's embeddings, as stored in the index
        contexts = torch.from_numpy(np.stack([np.stack([h.vector for h in ex_hits]) for ex_hits in hits])).to(queries)
    return torch.einsum("bd,bkd->bk", queries, contexts)  # (B, k)


def train_lsr(gen: Generator, retriever: DualEncoder, store: KnowledgeStore, examples: list[QAExample],
              cfg: LsrConfig, *, epochs: int = 1, max_steps: int = 0, seed: int = 0,
              on_step: StepCallback | None = None, optimizer_state: OptimizerState | None = None) -> dict[str, float]:
    """One LSR phase: candidates and LM scores once (both fixed during the phase), then AdamW on the retriever."""
    rng = random.Random(seed)
    start = time.perf_counter()
    hits = retrieve(retriever, store, [e.question for e in examples], cfg.top_k, with_vectors=True)
    keep = [i for i, h in enumerate(hits) if len(h) == cfg.top_k]  # a store smaller than k cannot rank k
    examples, hits = [examples[i] for i in keep], [hits[i] for i in keep]
    batches = [list(range(s, min(s + cfg.batch_size, len(examples)))) for s in range(0, len(examples), cfg.batch_size)]
    targets = lm_scores(gen, examples, hits, cfg) if examples else torch.zeros(0, cfg.top_k)  # (N, k), all at once
    optimizer = torch.optim.AdamW(retriever.trainable_parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    restore_optimizer(optimizer, optimizer_state)  # train.keep-optimizer-state: continue the last round's AdamW
    losses: list[float] = []
    retriever.query_model.train()
    try:
        for _ in range(epochs):
            rng.shuffle(batches)
            for b in batches:
                scores = retriever_scores(retriever, [examples[i] for i in b], [hits[i] for i in b])
                loss = lsr_loss(scores, targets[b].to(scores), retriever_temperature=cfg.retriever_temperature,
                                lm_temperature=cfg.lm_temperature, kl_direction=cfg.kl_direction)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if on_step is not None:
                    on_step(len(losses), losses[-1], None)
                if max_steps and len(losses) >= max_steps:
                    break
            if max_steps and len(losses) >= max_steps:
                break
    finally:
        retriever.query_model.eval()
    keep_optimizer(optimizer, optimizer_state)  # handed back in place, for the next round
    return {
        "lsr-loss-first": losses[0] if losses else 0.0,
        "lsr-loss-last": losses[-1] if losses else 0.0,
        "lsr-loss-mean": sum(losses) / len(losses) if losses else 0.0,
        "lsr-steps": float(len(losses)),
        "lsr-seconds": time.perf_counter() - start,
        "lsr-needs-reindex": float(retriever.train_context and bool(losses)),
    }
