"""The model layer on the real packaged models: resolution, LoRA state, retriever weights and folders."""

import json

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from fedrag_app.config.app_config import GeneratorConfig, RetrieverConfig
from fedrag_app.core.errors import ConfigError, WeightsError
from fedrag_app.rag.generator import generate, load_generator, load_lora_state_dict, lora_state_dict, save_adapter
from fedrag_app.rag.model_sources import resolve_generator, resolve_retriever
from fedrag_app.rag.prompts import build_prompt, format_passage
from fedrag_app.rag.retriever import load_retriever


def test_default_generator_is_a_cached_fp32_safetensors_folder():
    folder = resolve_generator("smollm2-135m-instruct")
    config = json.loads(open(f"{folder}/config.json").read())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config


def test_missing_local_path_is_a_clear_error():
    with pytest.raises(ConfigError, match="no such local path"):
        resolve_retriever("/nonexistent/model")


def test_hub_id_passes_through_for_users_with_network():
    assert resolve_generator("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_only_lora_weights_are_trainable(generator):
    trainable = {n for n, p in generator.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in generator.model.parameters() if p.requires_grad) == 460_800


def test_generator_answers_a_simple_question(generator):
    [answer] = generate(
        generator, [build_prompt(generator.tokenizer, "What is the capital of France?")], max_new_tokens=12
    )
    assert "Paris" in answer


def test_batched_generation_matches_single(generator):
    """Longest first, so the length-sorted batching reorders them: answers still come back in the callers' order."""
    prompts = [
        build_prompt(generator.tokenizer, q)
        for q in ("Who wrote Hamlet? Answer briefly, in one name.", "What is the capital of France?", "2+2?")
    ]
    single = [generate(generator, [p], max_new_tokens=8)[0] for p in prompts]
    assert len(set(single)) == 3
    assert generate(generator, prompts, max_new_tokens=8, batch_size=2) == single


def test_lora_state_round_trip_and_mismatch_errors(generator):
    state = lora_state_dict(generator)
    assert all(v.dtype == torch.float32 for v in state.values())
    changed = {k: v + 0.5 for k, v in state.items()}
    load_lora_state_dict(generator, changed)
    assert all(torch.equal(lora_state_dict(generator)[k], changed[k]) for k in state)
    load_lora_state_dict(generator, state)
    key = next(iter(state))
    with pytest.raises(WeightsError, match="missing"):
        load_lora_state_dict(generator, {k: v for k, v in state.items() if k != key})
    with pytest.raises(WeightsError, match="shape"):
        load_lora_state_dict(generator, {**state, key: torch.zeros(3, 3)})


def test_saved_adapter_reloads_trainable_with_identical_weights(generator, tmp_path):
    state = lora_state_dict(generator)
    nonzero = {k: torch.randn_like(v) * 0.01 for k, v in state.items()}
    load_lora_state_dict(generator, nonzero)
    try:
        resolved = generator.model.get_base_model().config._name_or_path  # the cached fp32 folder on this machine
        save_adapter(generator, tmp_path / "adapter")
        saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert saved["base_model_name_or_path"] == generator.name == "smollm2-135m-instruct", "no machine path"
        assert resolved not in (tmp_path / "adapter" / "README.md").read_text()
        assert generator.model.get_base_model().config._name_or_path == resolved, "the live model is unchanged"
        reloaded = load_generator(GeneratorConfig(), adapter_path=str(tmp_path / "adapter"))
        assert any(p.requires_grad for p in reloaded.model.parameters()), "adapter must load trainable"
        again = lora_state_dict(reloaded)
        assert all(torch.equal(again[k], nonzero[k]) for k in nonzero)
    finally:
        load_lora_state_dict(generator, state)


def test_bad_lora_target_module_is_a_config_error():
    with pytest.raises(ConfigError, match="lora-target-modules"):
        load_generator(GeneratorConfig(lora_target_modules=("no_such_proj",)))


def test_query_embeddings_carry_gradient_to_the_query_encoder(retriever):
    emb = retriever.encode_queries(["who founded rome"], grad=True)  # (1, 384)
    assert emb.shape == (1, retriever.dim) and torch.allclose(emb.norm(dim=-1), torch.ones(1))
    emb.sum().backward()
    grads = [p.grad for p in retriever.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    retriever.query_model.zero_grad(set_to_none=True)


def test_passage_encoding_equals_the_sentence_transformers_embedding(retriever):
    text = "Rome was founded, according to legend, by Romulus."
    ref = SentenceTransformer(resolve_retriever("all-minilm-l6-v2")).encode([text], normalize_embeddings=True)
    assert abs(float((retriever.encode_passages([text]) * ref).sum()) - 1.0) < 1e-5
    assert torch.allclose(retriever.encode_queries([text]), torch.from_numpy(ref), atol=1e-5)


def test_length_sorted_passage_batches_give_each_passage_its_own_embedding_in_input_order(retriever, small_passages):
    """encode_passages batches by token length (no mask when a batch has one length, padding and mask otherwise):
    every vector equals the passage encoded alone, in the caller's order, whatever the batch size."""
    texts = [format_passage(p.title, p.text) for p in small_passages[:48]]
    texts[5] = texts[6]  # two passages of one length in one batch, and a duplicate
    lengths = {len(ids) for ids in retriever.context_model.tokenizer(texts)["input_ids"]}
    assert len(lengths) > 10, "a spread of lengths, so batches mix lengths"
    alone = np.stack([retriever.context_model.encode([t], normalize_embeddings=True)[0] for t in texts])
    for batch_size in (1, 8, 64):
        got = retriever.encode_passages(texts, batch_size=batch_size)
        assert got.dtype == np.float32 and got.shape == (48, 384)
        np.testing.assert_allclose(got, alone, atol=2e-6, rtol=0)
    assert retriever.encode_passages([], batch_size=8).shape == (0, 384)


def test_top_layer_training_sends_only_those_layers():
    small = load_retriever(RetrieverConfig(train_top_layers=2))
    keys = small.trainable_state_dict()
    assert keys and all(".layer.4." in k or ".layer.5." in k for k in keys)
    assert sum(v.numel() for v in keys.values()) * 4 < 15e6  # about 14 MB in fp32, half in fp16


def test_retriever_saves_as_sentence_transformers_folders_and_reloads(tmp_path):
    r = load_retriever(RetrieverConfig())
    state = r.trainable_state_dict()
    moved = {k: v + 0.01 for k, v in state.items()}
    r.load_trainable_state_dict(moved)
    r.save(tmp_path / "retriever")
    st = SentenceTransformer(str(tmp_path / "retriever" / "query"))
    assert st.encode(["x"]).shape == (1, 384)
    back = load_retriever(RetrieverConfig(), path=str(tmp_path / "retriever"))
    assert all(torch.equal(back.trainable_state_dict()[k], moved[k]) for k in moved)
    with pytest.raises(WeightsError, match="unexpected"):
        back.load_trainable_state_dict({**moved, "query.bogus": torch.zeros(1)})
