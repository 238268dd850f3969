"""Labelled sequences and their batches, shared by RALT and LSR: prompt (the shared template) + answer, labels on
the answer only; length-grouped batches, right-padded tensors, and micro-batches that bound activation memory."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedrag_app.rag.prompts import answer_target, build_mmlu_prompt, build_prompt, truncate_passage

IGNORE = -100


@dataclass(frozen=True)
class LabelledSequence:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt and context, the token id on answer + EOS

    @property
    def answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def build_sequence(
    tokenizer,
    question: str,
    passage: str | None,
    answer: str,
    max_seq_len: int,
    *,
    label_eos: bool = True,
    choices: Sequence[str] | None = None,
) -> LabelledSequence:
    """Prompt (shared template) + answer + EOS, labels on the answer only; the passage absorbs any truncation.

    ``label_eos=False`` leaves EOS out of the labels (LSR scores how likely the answer is, not that it ends there).
    ``choices``: a multiple-choice question, prompted as MMLU evaluation prompts it; ``answer`` is then the letter,
    the token evaluation reads after "Answer:" (' A'..' D', with its space).
    """
    text = f" {answer.strip()}{tokenizer.eos_token}" if choices else answer_target(tokenizer, answer)
    target = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(target) < max_seq_len, f"answer of {len(target)} tokens does not fit max_seq_len {max_seq_len}"

    def prompt_ids(text: str | None) -> list[int]:
        passages = [text] if text else []
        prompt = (
            build_mmlu_prompt(tokenizer, question, choices, passages)
            if choices
            else build_prompt(tokenizer, question, passages)
        )
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]

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


def make_batches(
    sequences: list[LabelledSequence], batch_size: int, *, length_grouping: bool, rng: random.Random
) -> list[list[LabelledSequence]]:
    """Shuffled batches; with grouping, sequences are sorted by length inside mega-batches of 32 batches."""
    order = list(range(len(sequences)))
    rng.shuffle(order)
    if length_grouping:
        mega = batch_size * 32
        order = [
            i
            for s in range(0, len(order), mega)
            for i in sorted(order[s : s + mega], key=lambda i: len(sequences[i].input_ids))
        ]
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
