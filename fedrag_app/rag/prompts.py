"""The one prompt template, shared by training (RALT, LSR) and inference (ask, evaluate).

Prompts go through the tokenizer's chat template, so an instruction-tuned generator sees the format it
was tuned on. Training and inference call the same functions: a prompt built for a (question, passage)
pair is byte-identical in both.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedrag_app.data.loaders import CHOICE_LETTERS

SYSTEM_PROMPT = (
    "You answer questions. Use the context when it helps. Reply with the answer only, as briefly as possible."
)
MMLU_INSTRUCTION = "Answer with the letter of the correct choice."
MMLU_ANSWER_PREFIX = "Answer:"


def format_passage(title: str, text: str) -> str:
    """How a retrieved passage appears in a prompt: its title, then its text."""
    return f"{title}\n{text}" if title else text


def _chat(tokenizer, user: str) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _context_block(passages: Sequence[str]) -> str:
    if not passages:
        return ""
    return "Context:\n" + "\n\n".join(passages) + "\n\n"


def build_prompt(tokenizer, question: str, passages: Sequence[str] = ()) -> str:
    """Prompt for open QA: optional context passages, then the question; ends where the answer starts."""
    return _chat(tokenizer, f"{_context_block(passages)}Question: {question.strip()}")


def build_mmlu_prompt(tokenizer, question: str, choices: Sequence[str], passages: Sequence[str] = ()) -> str:
    """Prompt for a multiple-choice question; ends with 'Answer:' so the next token is the letter."""
    assert len(choices) == len(CHOICE_LETTERS), f"MMLU needs {len(CHOICE_LETTERS)} choices, got {len(choices)}"
    options = "\n".join(f"{letter}. {str(choice).strip()}" for letter, choice in zip(CHOICE_LETTERS, choices))
    user = f"{_context_block(passages)}Question: {question.strip()}\n{options}\n{MMLU_INSTRUCTION}"
    return _chat(tokenizer, user) + MMLU_ANSWER_PREFIX


def answer_target(tokenizer, answer: str) -> str:
    """What the generator is trained to produce after the prompt: the answer, then end-of-turn."""
    return answer.strip() + tokenizer.eos_token


def truncate_passage(tokenizer, passage: str, max_tokens: int) -> str:
    """Cut a passage to at most ``max_tokens`` tokens (used so the context, never the answer, is cut)."""
    if max_tokens <= 0:
        return ""
    ids = tokenizer(passage, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return passage
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
