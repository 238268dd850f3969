"""RALT: retrieval-augmented LM fine-tuning of the generator's LoRA adapter (docs/ALGORITHMS.md).

For each (question, answer): the top-k passages are retrieved once per round (batched; the retriever is frozen
during RALT) and give k separate sequences, prompt = the shared template with one passage, target = answer + EOS.
Only answer tokens carry labels (the prompt is given, not learned); the passage is truncated to fit the maximum
length, never the answer. Sequences of similar length are batched together so padding wastes little compute.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch

from fedrag_app.config.app_config import RaltConfig
from fedrag_app.data.loaders import CHOICE_LETTERS, MmluQuestion, QAExample
from fedrag_app.rag.generator import Generator
from fedrag_app.rag.knowledge_store import Hit, KnowledgeStore
from fedrag_app.rag.lm_scoring import answer_nll
from fedrag_app.rag.prompts import format_passage
from fedrag_app.rag.retrieval import retrieve
from fedrag_app.rag.retriever import DualEncoder
from fedrag_app.training.optimizer_state import OptimizerState, keep_optimizer, restore_optimizer
from fedrag_app.training.sequences import LabelledSequence, build_sequence, collate, make_batches, micro_batches


def build_ralt_sequences(
    tokenizer, examples: list[QAExample], hits: list[list[Hit]], cfg: RaltConfig, rng: random.Random
) -> list[LabelledSequence]:
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


def mixture_fits(tokenizer, questions: list[MmluQuestion], max_seq_len: int) -> list[MmluQuestion]:
    """The multiple-choice questions whose sequence fits ``max_seq_len`` with no passage. A longer one (about 1 in 8
    of MMLU dev + val at 256 tokens, mostly law and history) would lose the start of its prompt, teaching a letter for
    a question the model never sees whole, in a prompt evaluation never builds; it is left out of the mixture."""
    uncut = 1 << 30  # build_sequence cuts nothing below this: its length is the question's whole sequence
    return [
        q
        for q in questions
        if len(build_sequence(tokenizer, q.question, None, "A", uncut, choices=q.choices).input_ids) <= max_seq_len
    ]


def mixture_sequences(
    tokenizer, questions: list[MmluQuestion], hits: list[list[Hit]], cfg: RaltConfig, rng: random.Random
) -> list[LabelledSequence]:
    """The multiple-choice share of RA-DIT's mixture: each question prompted as MMLU evaluation prompts it, with its
    top-k passages (one sequence each), answered with the letter. Choices come in a fresh random order each time,
    so no letter is taught more often than another, whatever the gold letters of the pool."""
    sequences = []
    for q, q_hits in zip(questions, hits):
        order = list(range(len(CHOICE_LETTERS)))
        rng.shuffle(order)
        choices = [q.choices[i] for i in order]
        letter = CHOICE_LETTERS[order.index(CHOICE_LETTERS.index(q.answer))]
        for h in q_hits[: cfg.top_k]:
            passage = format_passage(h.title, h.text)
            sequences.append(build_sequence(tokenizer, q.question, passage, letter, cfg.max_seq_len, choices=choices))
    return sequences


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


def train_ralt(
    gen: Generator,
    retriever: DualEncoder,
    store: KnowledgeStore,
    examples: list[QAExample],
    cfg: RaltConfig,
    *,
    epochs: int = 1,
    max_steps: int = 0,
    seed: int = 0,
    on_step: StepCallback | None = None,
    optimizer_state: OptimizerState | None = None,
    mmlu: list[MmluQuestion] = (),
) -> dict[str, float]:
    """One RALT phase: retrieve once, then AdamW over length-grouped batches (each in micro-batches of at most
    ``cfg.forward_tokens`` padded tokens); returns scalar metrics. ``mmlu``: the round's multiple-choice questions
    of the mixture (ralt.mmlu-ratio), trained beside the open questions in the same shuffled batches.

    ``on_step(step, loss, batch)`` is called after each optimizer step (benchmarks time and count with it)."""
    rng = random.Random(seed)
    start = time.perf_counter()
    hits = retrieve(retriever, store, [e.question for e in examples] + [q.question for q in mmlu], cfg.top_k)
    sequences = build_ralt_sequences(gen.tokenizer, examples, hits[: len(examples)], cfg, rng)
    mixed = mixture_sequences(gen.tokenizer, list(mmlu), hits[len(examples) :], cfg, rng)
    sequences += mixed
    params = trainable_lora_parameters(gen)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    restore_optimizer(optimizer, optimizer_state)  # train.keep-optimizer-state: continue the last round's AdamW
    losses: list[float] = []
    tokens = 0
    gen.model.train()
    try:
        for _ in range(epochs):
            for batch in make_batches(
                sequences, cfg.batch_size * cfg.top_k, length_grouping=cfg.length_grouping, rng=rng
            ):
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
        "ralt-mmlu-sequences": float(len(mixed)),
        "ralt-tokens": float(tokens),
        "ralt-seconds": time.perf_counter() - start,
    }
