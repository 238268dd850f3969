"""answer_logprobs on the real SmolLM2: t−1 scores t, padding changes nothing, the LM head sees answer positions
only."""

import pytest
import torch

from fedrag_app.rag.lm_scoring import answer_logprobs, answer_nll
from fedrag_app.training.sequences import IGNORE, build_sequence, collate

PAIRS = [("what is the capital of france?", "Paris"), ("who wrote hamlet?", "William Shakespeare, Shakespeare")]


@pytest.fixture(scope="module")
def batch(generator):
    """Two right-padded sequences of different lengths (no passage, so they are short)."""
    seqs = [build_sequence(generator.tokenizer, q, None, a, 256) for q, a in PAIRS]
    assert len(seqs[0].input_ids) != len(seqs[1].input_ids)
    return seqs, collate(seqs, generator.tokenizer.pad_token_id, "cpu")


def hand_logprobs(model, seq) -> list[float]:
    """Unpadded forward, full (T, V) logits, log p of each labelled token read at the position before it."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq.input_ids])).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[t - 1, tok].item() for t, tok in enumerate(seq.labels) if tok != IGNORE]


def test_sum_and_mean_equal_a_hand_computation_from_full_logits(generator, batch):
    seqs, inputs = batch
    with torch.no_grad():
        summed = answer_logprobs(generator.model, **inputs, reduction="sum")  # (B,)
        mean = answer_logprobs(generator.model, **inputs, reduction="mean")  # (B,)
    for row, seq in enumerate(seqs):
        hand = hand_logprobs(generator.model, seq)
        assert len(hand) == seq.answer_tokens
        assert summed[row].item() == pytest.approx(sum(hand), abs=2e-3)
        assert mean[row].item() == pytest.approx(sum(hand) / len(hand), abs=2e-4)


def test_padding_a_sequence_beside_a_longer_one_does_not_change_its_score(generator, batch):
    seqs, inputs = batch
    with torch.no_grad():
        together = answer_logprobs(generator.model, **inputs)  # (2,)
        for row, seq in enumerate(seqs):
            alone = answer_logprobs(generator.model, **collate([seq], generator.tokenizer.pad_token_id, "cpu"))  # (1,)
            assert together[row].item() == pytest.approx(alone.item(), abs=1e-3)


def test_the_lm_head_runs_only_at_positions_that_predict_an_answer_token(generator, batch):
    seqs, inputs = batch
    head = generator.model.get_base_model().get_output_embeddings()
    rows_seen: list[int] = []
    hook = head.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            answer_logprobs(generator.model, **inputs)
    finally:
        hook.remove()
    assert rows_seen == [sum(s.answer_tokens for s in seqs)]
    assert rows_seen[0] < inputs["attention_mask"].sum().item() / 5  # most positions never reach the head


def test_ralt_loss_is_the_mean_over_sequences_of_per_token_mean_nll_and_reaches_lora(generator, batch):
    seqs, inputs = batch
    loss = answer_nll(generator.model, **inputs)
    expected = sum(-sum(h) / len(h) for h in (hand_logprobs(generator.model, s) for s in seqs)) / len(seqs)
    assert loss.item() == pytest.approx(expected, abs=2e-4)
    loss.backward()
    grads = [p.grad for n, p in generator.model.named_parameters() if "lora_B" in n]
    try:
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    finally:
        generator.model.zero_grad(set_to_none=True)


def test_the_shared_prefix_cache_reaches_the_decoder(tiny_models_config):
    """The shared-prefix path passes the prefix's keys/values as ``cache=`` (transformers 5; on 4.x the keyword
    would be swallowed by **kwargs and the suffix scored alone, silently): its scores must equal the full forward
    without a cache and differ from scoring the suffix alone (tiny model: the decoder path, not the maths)."""
    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.lm_scoring import shared_prefix_length

    gen = load_generator(AppConfig.from_flat(tiny_models_config).generator)
    seqs = [build_sequence(gen.tokenizer, q, None, a, 256) for q, a in PAIRS]
    inputs = collate(seqs, gen.tokenizer.pad_token_id, "cpu")
    n = shared_prefix_length(inputs["input_ids"], inputs["labels"])
    assert n >= 16, "the chat template's system prompt is the rows' shared prefix"
    suffix = {k: v[:, n:] for k, v in inputs.items()}
    with torch.no_grad():
        shared = answer_logprobs(gen.model, **inputs, share_prefix=True)  # (B,) prefix once, as a cache
        full = answer_logprobs(gen.model, **inputs)  # (B,) every token through the decoder, no cache
        alone = answer_logprobs(gen.model, **suffix)  # (B,) what an ignored cache would give
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
    assert (shared - alone).abs().min() > 1e-3, "the prefix changed no score: the cache was ignored"
