"""The speed work (issue 22) leaves the maths alone: micro-batched RALT steps on the real SmolLM2 give the losses,
gradients and trained LoRA weights of an unoptimised reference (whole batch, explicit attention mask, full
LM head, textbook cross-entropy), and the mask-free causal path scores what the masked one does."""

import pytest
import torch

from fedrag_app.rag.generator import load_lora_state_dict, lora_state_dict
from fedrag_app.rag.lm_scoring import answer_logprobs, shared_prefix_length
from fedrag_app.rag.prompts import format_passage
from fedrag_app.training.ralt import accumulate_gradients, trainable_lora_parameters
from fedrag_app.training.sequences import IGNORE, LabelledSequence, build_sequence, collate, micro_batches

LR = 1e-3
PAIRS = [  # passages of very different lengths, so the batch is padded and the micro-batches differ in width
    (
        "who was the first president?",
        "George Washington was the first president of the United States.",
        "George Washington",
    ),
    ("what is the capital of france?", None, "Paris"),
    (
        "where was mozart born?",
        " ".join(["Mozart was born in Salzburg in 1756 and moved to Vienna later."] * 6),
        "Salzburg",
    ),
    ("what language is spoken in brazil?", "Portuguese is the official language of Brazil.", "Portuguese"),
]


def reference_loss(model, batch: list[LabelledSequence], pad_id: int) -> torch.Tensor:
    """The code before issue 22, spelled out: one padded forward with the (B, T) mask, logits at every position."""
    inputs = collate(batch, pad_id, "cpu")
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits  # (B, T, V)
    per_seq = [
        torch.nn.functional.cross_entropy(logits[b, :-1], inputs["labels"][b, 1:], ignore_index=IGNORE)
        for b in range(len(batch))
    ]
    return torch.stack(per_seq).mean()


@pytest.fixture
def tiny_batch(generator):
    tok = generator.tokenizer
    return [build_sequence(tok, q, format_passage("T", p) if p else None, a, 256) for q, p, a in PAIRS]


@pytest.fixture
def restore_lora(generator):
    saved = lora_state_dict(generator)
    yield saved
    load_lora_state_dict(generator, saved)


def _train(generator, batch, step_loss, steps: int = 2) -> tuple[list[float], list[torch.Tensor], dict]:
    """``steps`` AdamW steps from the saved adapter; dropout off (eval mode) so both paths see the same function."""
    params = trainable_lora_parameters(generator)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    losses, first_grads = [], []
    for step in range(steps):
        losses.append(step_loss())
        if step == 0:
            first_grads = [p.grad.detach().clone() for p in params]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, first_grads, lora_state_dict(generator)


def test_micro_batched_steps_match_the_whole_batch_reference(generator, tiny_batch, restore_lora):
    pad = generator.tokenizer.pad_token_id
    widths = sorted(len(s.input_ids) for s in tiny_batch)
    budget = 2 * widths[1]  # the two short ones together, then the others one or two at a time
    assert len(micro_batches(tiny_batch, budget)) >= 2
    generator.model.eval()

    def reference_step() -> float:
        loss = reference_loss(generator.model, tiny_batch, pad)
        loss.backward()
        return loss.item()

    ref_losses, ref_grads, ref_weights = _train(generator, tiny_batch, reference_step)
    load_lora_state_dict(generator, restore_lora)
    ours_losses, ours_grads, ours_weights = _train(
        generator, tiny_batch, lambda: accumulate_gradients(generator, tiny_batch, budget)[0]
    )

    assert ours_losses == pytest.approx(ref_losses, rel=1e-5)
    assert ref_losses[1] < ref_losses[0]  # the adapter did move: the comparison covers trained weights
    scale = max(float(g.abs().max()) for g in ref_grads)  # sums in another order: noise ~1e-5 of the largest
    for ours, ref in zip(ours_grads, ref_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-4 * scale)
    # AdamW's first steps move each weight by about ±lr whatever its gradient's size, so an element whose gradient
    # is float noise may go either way; everything else must land on the reference's weights.
    moved = torch.cat([(ref_weights[k] - restore_lora[k]).flatten() for k in sorted(ref_weights)])
    diff = torch.cat([(ours_weights[k] - ref_weights[k]).flatten() for k in sorted(ref_weights)])
    assert float(moved.norm()) > 0
    assert float(diff.norm()) < 1e-2 * float(moved.norm())
    assert int((diff.abs() > LR * 1e-2).sum()) <= 1e-3 * diff.numel()


def test_whole_batch_at_once_is_the_same_step(generator, tiny_batch, restore_lora):
    generator.model.eval()
    params = trainable_lora_parameters(generator)
    load_lora_state_dict(generator, {k: v + 0.01 * torch.randn_like(v) for k, v in restore_lora.items()})  # B != 0
    whole, _ = accumulate_gradients(generator, tiny_batch, 0)
    whole_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    split, _ = accumulate_gradients(generator, tiny_batch, 1)  # every sequence alone
    scale = max(float(g.abs().max()) for g in whole_grads)
    for p, g in zip(params, whole_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4 * scale)
        p.grad = None
    assert split == pytest.approx(whole, rel=1e-5)


def _masked_reference(generator, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log p of the answer tokens per row, and their count, from the plain masked full-vocabulary forward."""
    logits = generator.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = inputs["labels"][:, 1:]
    keep = labels != IGNORE
    return (logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep).sum(dim=1), keep.sum(dim=1)


def test_right_padded_scoring_without_the_mask_equals_the_masked_forward(generator, tiny_batch):
    inputs = collate(tiny_batch, generator.tokenizer.pad_token_id, "cpu")
    assert int(inputs["attention_mask"].sum()) < inputs["attention_mask"].numel()  # really padded
    with torch.no_grad():
        ours = answer_logprobs(generator.model, **inputs)  # (B,), the causal path without a mask
        masked, _ = _masked_reference(generator, inputs)
    torch.testing.assert_close(ours, masked, rtol=1e-5, atol=1e-4)


def test_micro_batches_keep_every_sequence_within_the_budget():
    seqs = [LabelledSequence([1] * n, [IGNORE] * n) for n in (50, 300, 120, 700, 90, 310)]
    runs = micro_batches(seqs, 600)
    assert sorted(id(s) for r in runs for s in r) == sorted(id(s) for s in seqs)
    assert all(len(r) * max(len(s.input_ids) for s in r) <= 600 for r in runs if len(r) > 1)
    assert [len(s.input_ids) for s in runs[-1]] == [700]  # longer than the budget: alone
    assert micro_batches(seqs, 0) == [sorted(seqs, key=lambda s: len(s.input_ids))]


def test_scoring_with_the_shared_prefix_cached_equals_the_full_forward(generator, tiny_batch):
    """LSR scoring runs the rows' common leading tokens (the chat template's system prompt) once, as a key/value
    cache: the same scores as the masked full forward, on a padded batch of different lengths."""
    inputs = collate(tiny_batch, generator.tokenizer.pad_token_id, "cpu")
    n = shared_prefix_length(inputs["input_ids"], inputs["labels"])
    assert n >= 16 and bool((inputs["labels"][:, : n + 1] == IGNORE).all())  # the path really runs; no answer in it
    with torch.no_grad():
        shared = answer_logprobs(generator.model, **inputs, share_prefix=True)
        mean = answer_logprobs(generator.model, **inputs, share_prefix=True, reduction="mean")
        masked, counts = _masked_reference(generator, inputs)
    torch.testing.assert_close(shared, masked, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mean, masked / counts, rtol=1e-5, atol=1e-4)
    assert shared_prefix_length(inputs["input_ids"][:1], inputs["labels"][:1]) == 0  # one row: nothing to share
