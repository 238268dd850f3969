"""RALT: retrieval-augmented LM fine-tuning of the generator's LoRA adapter (ALGORITHMS.md).

For each (question, answer): the top-k passages are retrieved once per round (batched; the retriever is frozen
during RALT) and give k separate sequences, prompt = the shared template with one passage, target = answer + EOS.
Only answer tokens carry labels (FedRAG trains on the prompt too); the passage is truncated to fit the maximum
length, never the answer. Sequences of similar length are batched together so padding wastes little compute.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fedrag_app.config import RaltConfig
from fedrag_app.data import QAExample
from fedrag_app.generator import Generator
from fedrag_app.knowledge_store import Hit, KnowledgeStore
from fedrag_app.lm_scoring import answer_nll
from fedrag_app.optimizer_state import OptimizerState, keep_optimizer, restore_optimizer
from fedrag_app.prompts import answer_target, build_prompt, format_passage, truncate_passage
from fedrag_app.retriever import DualEncoder

IGNORE = -100
QUERY_BATCH = 64


@dataclass(frozen=True)
class LabelledSequence:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt and context, the token id on answer + EOS

    @property
    def answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def retrieve(retriever: DualEncoder, store: KnowledgeStore, questions: list[str], top_k: int,
             *, with_vectors: bool = False) -> list[list[Hit]]:
    """Top-k hits for every question: queries encoded and searched in batches."""
    hits: list[list[Hit]] = []
    for start in range(0, len(questions), QUERY_BATCH):
        queries = retriever.encode_queries(questions[start : start + QUERY_BATCH]).cpu().numpy()  # (b, D)
        hits.extend(store.search_batch(queries, top_k, with_vectors=with_vectors))
    return hits


def build_sequence(tokenizer, question: str, passage: str | None, answer: str, max_seq_len: int,
                   *, label_eos: bool = True) -> LabelledSequence:
    """Prompt (shared template) + answer + EOS, labels on the answer only; the passage absorbs any truncation.

    ``label_eos=False`` leaves EOS out of the labels (LSR scores how likely the answer is, not that it ends there).
    """
    target = tokenizer(answer_target(tokenizer, answer), add_special_tokens=False)["input_ids"]
    assert len(target) < max_seq_len, f"answer of {len(target)} tokens does not fit max_seq_len {max_seq_len}"

    def prompt_ids(text: str | None) -> list[int]:
        return tokenizer(build_prompt(tokenizer, question, [text] if text else []), add_special_tokens=False)["input_ids"]

    ids = prompt_ids(passage)
    if passage and len(ids) + len(target) > max_seq_len:
        passage_len = len(tokenizer(passage, add_special_tokens=False)["input_ids"])
        budget = passage_len - (len(ids) + len(target) - max_seq_len)
        while True:  # re-tokenising a cut passage can shift a token or two: shrink until it fits
            ids = prompt_ids(truncate_passage(tokenizer, passage, budget))
            if len(ids) + len(target) <= max_seq_len or budget <= 0:
                break
            budget -= 2
    if len(ids) + len(target) > max_seq_len:  # the question alone is too long: keep the prompt's end
        ids = ids[len(ids) + len(target) - max_seq_len :]
    labels = target if label_eos else target[:-1] + [IGNORE]
    return LabelledSequence(ids + target, [IGNORE] * len(ids) + labels)


def build_ralt_sequences(tokenizer, examples: list[QAExample], hits: list[list[Hit]], cfg: RaltConfig,
                         rng: random.Random) -> list[LabelledSequence]:
    """k sequences per example (one per retrieved passage), plus a share of no-context sequences."""
    sequences = [
        build_sequence(tokenizer, ex.question, format_passage(h.title, h.text), ex.target, cfg.max_seq_len)
        for ex, ex_hits in zip(examples, hits)
        for h in ex_hits[: cfg.top_k]
    ]
    extra = round(cfg.no_context_ratio * len(examples))
    for ex in rng.sample(examples, extra):
        sequences.append(build_sequence(tokenizer, ex.question, None, ex.target, cfg.max_seq_len))
    return sequences


def make_batches(sequences: list[LabelledSequence], batch_size: int, *, length_grouping: bool,
                 rng: random.Random) -> list[list[LabelledSequence]]:
    """Shuffled batches; with grouping, sequences are sorted by length inside mega-batches of 32 batches."""
    order = list(range(len(sequences)))
    rng.shuffle(order)
    if length_grouping:
        mega = batch_size * 32
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s : s + mega], key=lambda i: len(sequences[i].input_ids))]
    batches = [[sequences[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    if length_grouping:
        rng.shuffle(batches)
    return batches


def collate(batch: list[LabelledSequence], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding is masked out and labelled IGNORE (never detected by token id)."""
    width = max(len(s.input_ids) for s in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for row, s in enumerate(batch):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def micro_batches(batch: list[LabelledSequence], max_tokens: int) -> list[list[LabelledSequence]]:
    """The batch sorted by length and cut into runs of whole sequences whose padded size (rows x widest) stays
    within ``max_tokens`` (0: one run). Activation memory follows the run, and each run pads only to its own
    widest sequence; a sequence longer than the budget runs alone."""
    ordered = sorted(batch, key=lambda s: len(s.input_ids))
    if not max_tokens:
        return [ordered]
    runs: list[list[LabelledSequence]] = [[]]
    for s in ordered:  # ascending: the newest sequence is the widest of its run
        if runs[-1] and len(s.input_ids) * (len(runs[-1]) + 1) > max_tokens:
            runs.append([])
        runs[-1].append(s)
    return runs


def accumulate_gradients(gen: Generator, batch: list[LabelledSequence], max_tokens: int) -> tuple[float, int]:
    """Backward of RALT's batch loss (the mean over sequences of answer_nll), one micro-batch at a time:
    each run's mean is weighted by its share of the sequences, so the gradients sum to the whole batch's.
    Returns (loss, non-padding tokens)."""
    loss, tokens = 0.0, 0
    for run in micro_batches(batch, max_tokens):
        inputs = collate(run, gen.tokenizer.pad_token_id, gen.device)
        part = answer_nll(gen.model, **inputs) * (len(run) / len(batch))
        part.backward()
        loss += part.item()
        tokens += int(inputs["attention_mask"].sum())
    return loss, tokens


StepCallback = Callable[[int, float, "dict[str, torch.Tensor] | None"], None]


def trainable_lora_parameters(gen: Generator) -> list[torch.nn.Parameter]:
    """The LoRA weights, and a check that nothing else trains (the base stays frozen)."""
    named = [(n, p) for n, p in gen.model.named_parameters() if p.requires_grad]
    stray = [n for n, _ in named if "lora_" not in n]
    assert not stray, f"RALT trains LoRA only, but these base weights require grad: {stray[:3]}"
    return [p for _, p in named]


def train_ralt(gen: Generator, retriever: DualEncoder, store: KnowledgeStore, examples: list[QAExample],
               cfg: RaltConfig, *, epochs: int = 1, max_steps: int = 0, seed: int = 0,
               on_step: StepCallback | None = None, optimizer_state: OptimizerState | None = None) -> dict[str, float]:
    """One RALT phase: retrieve once, then AdamW over length-grouped batches (each in micro-batches of at most
    ``cfg.forward_tokens`` padded tokens); returns scalar metrics.

    ``on_step(step, loss, batch)`` is called after each optimizer step (benchmarks time and count with it)."""
    rng = random.Random(seed)
    start = time.perf_counter()
    hits = retrieve(retriever, store, [e.question for e in examples], cfg.top_k)
    sequences = build_ralt_sequences(gen.tokenizer, examples, hits, cfg, rng)
    params = trainable_lora_parameters(gen)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    restore_optimizer(optimizer, optimizer_state)  # train.keep-optimizer-state: continue the last round's AdamW
    losses: list[float] = []
    tokens = 0
    gen.model.train()
    try:
        for _ in range(epochs):
            for batch in make_batches(sequences, cfg.batch_size * cfg.top_k, length_grouping=cfg.length_grouping, rng=rng):
                loss, batch_tokens = accumulate_gradients(gen, batch, cfg.forward_tokens)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss)
                tokens += batch_tokens
                if on_step is not None:
                    on_step(len(losses), losses[-1], collate(batch, gen.tokenizer.pad_token_id, gen.device))
                if max_steps and len(losses) >= max_steps:
                    break
            if max_steps and len(losses) >= max_steps:
                break
    finally:
        gen.model.eval()
    keep_optimizer(optimizer, optimizer_state)  # handed back in place, for the next round
    return {
        "ralt-loss-first": losses[0] if losses else 0.0,
        "ralt-loss-last": losses[-1] if losses else 0.0,
        "ralt-loss-mean": sum(losses) / len(losses) if losses else 0.0,
        "ralt-steps": float(len(losses)),
        "ralt-sequences": float(len(sequences)),
        "ralt-tokens": float(tokens),
        "ralt-seconds": time.perf_counter() - start,
    }
