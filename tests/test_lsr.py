"""LSR on the real MiniLM and SmolLM2: the retriever moves (FedRAG's does not), the LM scores are right, and
the ranking moves toward the passage that holds the answer."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedrag_app.config.app_config import DataConfig, LsrConfig, RetrieverConfig
from fedrag_app.data.loaders import QAExample, load_web_questions
from fedrag_app.rag.knowledge_store import Hit, KnowledgeStore
from fedrag_app.rag.prompts import format_passage
from fedrag_app.rag.retrieval import retrieve
from fedrag_app.rag.retriever import load_retriever
from fedrag_app.training.lsr import lm_scores, log_distributions, lsr_loss, retriever_scores, train_lsr
from fedrag_app.training.sequences import IGNORE, build_sequence

QUESTION = QAExample("q", "what is the capital of france?", ("Paris",), "france")
PASSAGES = [
    ("Amazon River", "The Amazon River in South America is the largest river by discharge volume of water."),
    ("France", "Paris is the capital and most populous city of France, on the river Seine."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("Jupiter", "Jupiter is the fifth planet from the Sun and the largest in the Solar System."),
]


@pytest.mark.parametrize("in_batch_negatives", [False, True])
def test_one_lsr_step_changes_the_query_encoder(generator, small_shard_path, in_batch_negatives):
    retriever = load_retriever(RetrieverConfig(train_top_layers=0))  # every layer: all of them must move
    before = retriever.trainable_state_dict()
    examples = [
        QAExample(str(i), q, (a,), "")
        for i, (q, a) in enumerate(
            [
                ("what is the name of justin bieber brother?", "Jaxon Bieber"),
                ("who was the first president?", "George Washington"),
            ]
        )
    ]
    with KnowledgeStore.open(path=small_shard_path) as store:
        cfg = LsrConfig(top_k=4, learning_rate=1e-4, in_batch_negatives=in_batch_negatives)  # both questions: 1 batch
        metrics = train_lsr(generator, retriever, store, examples, cfg, max_steps=1)
    after = retriever.trainable_state_dict()
    assert metrics["lsr-steps"] == 1
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 50, "LSR must move the query encoder's weights"


def test_lm_score_equals_a_hand_computation_from_full_logits(generator):
    hits = [[Hit(t, 0.0, t, x) for t, x in PASSAGES[:2]]]
    cfg = LsrConfig(lm_score="sum")
    ours = lm_scores(generator, [QUESTION], hits, cfg)[0]  # (k,)
    for j, (title, text) in enumerate(PASSAGES[:2]):
        seq = build_sequence(
            generator.tokenizer, QUESTION.question, format_passage(title, text), QUESTION.target, 512, label_eos=False
        )
        with torch.no_grad():
            logits = generator.model(input_ids=torch.tensor([seq.input_ids])).logits[0]  # (T, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        hand = sum(logp[t - 1, tok].item() for t, tok in enumerate(seq.labels) if tok != IGNORE)  # t-1 predicts t
        off_by_one = sum(logp[t, tok].item() for t, tok in enumerate(seq.labels) if tok != IGNORE and t < len(logp))
        assert ours[j].item() == pytest.approx(hand, abs=1e-3)
        assert abs(ours[j].item() - off_by_one) > 1.0  # FedRAG's indexing gives a different number
    assert ours[1] > ours[0], "the passage that states the answer must make it more likely"


def test_temperatures_sharpen_and_flatten_the_distributions():
    retr, lm = torch.tensor([[0.3, 0.5, 0.1]]), torch.tensor([[-4.0, -1.0, -6.0]])

    def entropy(log_p):
        return -(log_p.exp() * log_p).sum().item()

    sharp_r, sharp_l = log_distributions(retr, lm, retriever_temperature=0.05, lm_temperature=0.5)
    flat_r, flat_l = log_distributions(retr, lm, retriever_temperature=1.0, lm_temperature=5.0)
    assert entropy(sharp_r) < entropy(flat_r) and entropy(sharp_l) < entropy(flat_l)
    np.testing.assert_allclose(flat_l.exp().numpy(), F.softmax(lm / 5.0, dim=-1).numpy(), rtol=1e-6)
    assert sharp_r.exp().argmax().item() == 1 and sharp_l.exp().argmax().item() == 1


def test_kl_direction_matches_a_hand_written_kl_on_a_2x3_example():
    retr = torch.tensor([[0.2, 0.4, 0.1], [0.9, 0.3, 0.5]])
    lm = torch.tensor([[-3.0, -1.0, -2.0], [-0.5, -4.0, -1.5]])
    p_r, p_lsr = F.softmax(retr / 0.1, -1), F.softmax(lm / 1.0, -1)
    kl_lsr_r = (p_lsr * (p_lsr.log() - p_r.log())).sum(-1).mean()
    kl_r_lsr = (p_r * (p_r.log() - p_lsr.log())).sum(-1).mean()
    kw = dict(retriever_temperature=0.1, lm_temperature=1.0)
    assert lsr_loss(retr, lm, kl_direction="lsr-retriever", **kw).item() == pytest.approx(kl_lsr_r.item(), rel=1e-5)
    assert lsr_loss(retr, lm, kl_direction="retriever-lsr", **kw).item() == pytest.approx(kl_r_lsr.item(), rel=1e-5)
    assert lsr_loss(retr, lm, kl_direction="lsr-retriever", **kw).item() == pytest.approx(
        F.kl_div(F.log_softmax(retr / 0.1, -1), p_lsr, reduction="batchmean").item(), rel=1e-5
    )


def test_in_batch_negatives_match_a_hand_written_kl_over_the_batchs_candidates():
    """lsr.in-batch-negatives: p_R over all B·k candidates of the batch (a candidate the question shares with another
    question counted once, as its own), p_LSR on the question's own k; one question alone is lsr_loss."""
    from fedrag_app.training.lsr import in_batch_lsr_loss, shared_candidates

    cross = torch.tensor([[0.2, 0.4, 0.1, 0.7, 0.3, 0.6], [0.9, 0.3, 0.5, 0.2, 0.8, 0.4]])  # (B=2, B·k=6)
    lm = torch.tensor([[-3.0, -1.0, -2.0], [-0.5, -4.0, -1.5]])
    hits = [[Hit(i, 0.0, "", "") for i in ("a", "b", "c")], [Hit(i, 0.0, "", "") for i in ("d", "b", "e")]]
    shared = shared_candidates(hits)
    assert shared.tolist() == [[False, False, False, False, True, False], [False, True, False, False, False, False]]
    kw = dict(retriever_temperature=0.1, lm_temperature=1.0)
    hand = []
    for row, own in ((0, [0, 1, 2]), (1, [3, 4, 5])):
        kept = [j for j in range(6) if not shared[row, j]]
        log_z = torch.logsumexp(cross[row, kept] / 0.1, 0)
        log_p_r = cross[row, own] / 0.1 - log_z
        p_lsr = F.softmax(lm[row], -1)
        hand.append((p_lsr * (p_lsr.log() - log_p_r)).sum())
    assert in_batch_lsr_loss(cross, lm, shared, **kw).item() == pytest.approx(torch.stack(hand).mean().item(), rel=1e-5)
    alone = in_batch_lsr_loss(cross[:1, :3], lm[:1], shared_candidates(hits[:1]), **kw)
    assert alone.item() == pytest.approx(lsr_loss(cross[:1, :3], lm[:1], **kw).item(), rel=1e-6)
    assert in_batch_lsr_loss(cross, lm, shared, **kw) > lsr_loss(torch.stack([cross[0, :3], cross[1, 3:]]), lm, **kw), (
        "the negatives take probability from the own candidates: a larger loss to push them down"
    )


def test_in_batch_negatives_count_a_passage_two_other_questions_share_once():
    """A passage in two other questions' candidates is one negative for the third, not two (pushed down once)."""
    from fedrag_app.training.lsr import shared_candidates

    hits = [[Hit(i, 0.0, "", "") for i in ids] for ids in (("a", "b"), ("p", "c"), ("d", "p"))]
    assert shared_candidates(hits).tolist() == [
        [False, False, False, False, False, True],  # question 0: its own, c, d and p once
        [False, False, False, False, False, True],  # question 1: p is its own, wherever it appears
        [False, False, True, False, False, False],  # question 2: p is its own
    ]


def test_in_batch_negatives_need_the_lsr_retriever_direction():
    from fedrag_app.core.errors import ConfigError

    with pytest.raises(ConfigError, match="lsr.in-batch-negatives"):
        LsrConfig(in_batch_negatives=True, kl_direction="retriever-lsr")


PRESIDENT = QAExample("p", "who was the first president of the united states?", ("George Washington",), "")
PRESIDENT_PASSAGES = [  # the retriever likes the first for its wording; only the second holds the answer
    (
        "President of the United States",
        "The president of the United States is the head of state and head of "
        "government of the United States, elected every four years.",
    ),
    (
        "George Washington",
        "George Washington commanded the Continental Army and in 1789 was inaugurated as the first "
        "to hold the nation's highest office.",
    ),
    ("White House", "The White House in Washington, D.C. is the official residence and workplace of the president."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level."),
]


def test_the_answer_passage_gains_retrieval_probability(generator):
    torch.manual_seed(0)  # the query encoder trains with dropout: fix its masks so the test does not depend on order
    retriever = load_retriever(RetrieverConfig(train_top_layers=0))
    vectors = retriever.encode_passages([format_passage(t, x) for t, x in PRESIDENT_PASSAGES])
    hits = [[Hit(t, 0.0, t, x, v) for (t, x), v in zip(PRESIDENT_PASSAGES, vectors)]]
    cfg = LsrConfig(top_k=4, retriever_temperature=0.1, lm_temperature=1.0, learning_rate=5e-5)
    target = lm_scores(generator, [PRESIDENT], hits, cfg)  # (1, 4): fixed during LSR
    assert target.argmax().item() == 1, "the LM must find the answer passage most useful"
    optimizer = torch.optim.AdamW(retriever.trainable_parameters(), lr=cfg.learning_rate)

    def p_answer() -> float:
        with torch.no_grad():
            return F.softmax(retriever_scores(retriever, [PRESIDENT], hits) / cfg.retriever_temperature, -1)[
                0, 1
            ].item()

    before = p_answer()
    assert before < 0.8, "the case must leave room to rise"
    for _ in range(5):
        loss = lsr_loss(
            retriever_scores(retriever, [PRESIDENT], hits), target, retriever_temperature=0.1, lm_temperature=1.0
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert p_answer() > before + 0.05, (before, p_answer())


SHARD_TOPICS = {"abraham_lincoln", "alabama", "aristotle", "ayn_rand", "algeria", "andorra", "alaska"}  # in the 300


def test_train_lsr_with_the_defaults_moves_the_lm_preferred_passage_up(generator, small_shard_path, data_dir, tmp_path):
    """issue 16 item 7: the trainer itself, default settings, real questions against the real 300-passage shard.
    It fails if the gradient does not reach the query encoder (checked by detaching the query embeddings).
    The LM scores the test computes go through a score cache that train_lsr then reads (the frozen generator's
    path, train.mode = lsr; the cache returns what lm_scores computes: test below), so SmolLM2 scores them once."""
    from fedrag_app.training.score_cache import ScoreCache

    torch.manual_seed(0)
    cache = ScoreCache(tmp_path / "scores.sqlite")
    retriever = load_retriever(RetrieverConfig())  # its own copy: it trains
    cfg = LsrConfig()
    examples = [e for e in load_web_questions("train", DataConfig(dir=str(data_dir))) if e.topic in SHARD_TOPICS][:8]
    with KnowledgeStore.open(path=small_shard_path) as store:
        hits = retrieve(retriever, store, [e.question for e in examples], cfg.top_k, with_vectors=True)
    target = lm_scores(generator, examples, hits, cfg, cache=cache)  # (8, k): what train_lsr will read again
    favourite = target.argmax(-1)  # (8,): the LM's preferred candidate

    def measure() -> tuple[float, float, int]:
        """KL(p_LSR || p_R), mean p_R of the favourite, sum of its ranks, on the same candidates as train_lsr's."""
        with torch.no_grad():
            scores = retriever_scores(retriever, examples, hits)  # (8, k)
        kl = lsr_loss(
            scores, target, retriever_temperature=cfg.retriever_temperature, lm_temperature=cfg.lm_temperature
        )
        fav = scores[torch.arange(8), favourite]
        p_fav = F.softmax(scores / cfg.retriever_temperature, -1)[torch.arange(8), favourite]
        return kl.item(), p_fav.mean().item(), int((1 + (scores > fav[:, None]).sum(-1)).sum())

    kl_before, p_before, ranks_before = measure()
    assert ranks_before > 8 + 6, "the LM must prefer passages the retriever does not rank first"
    with KnowledgeStore.open(path=small_shard_path) as store:
        metrics = train_lsr(generator, retriever, store, examples, cfg, epochs=6, seed=0, cache=cache)
    cache.close()
    assert metrics["lsr-scores-cached"] == 1.0, "the same candidates: every LM score from the cache"
    kl_after, p_after, ranks_after = measure()
    assert p_after > p_before + 0.15, (p_before, p_after)  # measured: 0.25 -> 0.60
    assert ranks_after <= ranks_before - 6, (ranks_before, ranks_after)  # 21 -> 8 (8 = first everywhere)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)  # 0.62 -> 0.03
    assert metrics["lsr-steps"] == 12 and metrics["lsr-target-entropy-norm"] < 0.9, metrics
    assert metrics["lsr-kl-last"] < metrics["lsr-kl-first"], metrics


def test_the_score_cache_answers_a_frozen_generator_and_misses_a_changed_one(generator, tmp_path):
    from fedrag_app.rag.generator import load_lora_state_dict, lora_state_dict
    from fedrag_app.training.score_cache import ScoreCache

    hits = [[Hit(t, 0.0, t, x) for t, x in PASSAGES]]
    mean, total = LsrConfig(lm_score="mean"), LsrConfig(lm_score="sum")
    plain = lm_scores(generator, [QUESTION], hits, total)  # (1, 4), no cache
    with ScoreCache(tmp_path / "scores.sqlite") as cache:
        first = lm_scores(generator, [QUESTION], hits, mean, cache=cache)
        assert (cache.hits, cache.misses) == (0, 4)
    with ScoreCache(tmp_path / "scores.sqlite") as cache:  # reopened, as the next round or run would
        again = lm_scores(generator, [QUESTION], hits, total, cache=cache)  # 'sum' and 'mean' share entries
        assert (cache.hits, cache.misses) == (4, 0)
        np.testing.assert_allclose(again.numpy(), plain.numpy(), atol=1e-4)
        np.testing.assert_allclose(
            first.numpy(),
            (plain / len(generator.tokenizer("Paris", add_special_tokens=False)["input_ids"])).numpy(),
            atol=1e-4,
        )
        saved = lora_state_dict(generator)
        assert not any(v.any() for k, v in saved.items() if ".lora_B." in k), "a fresh adapter: every B is 0"
        try:
            # another seed's fresh adapter (other A, B = 0) is the same function: its scores are shared
            load_lora_state_dict(
                generator, {k: torch.randn_like(v) if ".lora_A." in k else v for k, v in saved.items()}
            )
            lm_scores(generator, [QUESTION], hits, total, cache=cache)
            assert cache.misses == 0, "a fresh adapter of another seed computes the same scores"
            load_lora_state_dict(generator, {k: v + 0.01 if ".lora_B." in k else v for k, v in saved.items()})
            lm_scores(generator, [QUESTION], hits, total, cache=cache)
            assert cache.misses == 4, "a changed adapter must never read the old generator's scores"
        finally:
            load_lora_state_dict(generator, saved)
        other = QAExample("q", QUESTION.question, ("Lyon",), "")
        lm_scores(generator, [other], hits, total, cache=cache)
        assert cache.misses == 8, "another answer is another sequence"


def test_a_scorer_adapter_scores_as_that_adapter_loaded_whole_and_leaves_the_generator_as_it_was(generator, tmp_path):
    """lsr.scorer-adapter: LSR's targets from another adapter (a RALT one, which reads its passage), loaded beside
    the trained adapter for the scoring only: same scores as a generator loaded with it, and afterwards the trained
    adapter, its trainable flags (FFA-LoRA's frozen A) and the saved adapters are untouched."""
    from fedrag_app.config.app_config import GeneratorConfig
    from fedrag_app.core.errors import ConfigError
    from fedrag_app.rag.generator import load_generator, save_adapter, scoring_adapter, set_lora_a_trainable

    torch.manual_seed(1)
    tuned = load_generator(GeneratorConfig())
    with torch.no_grad():
        for name, p in tuned.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a LoRA that changes the answers, as a trained one does
    save_adapter(tuned, tmp_path / "scorer")
    hits = [[Hit(t, 0.0, t, x) for t, x in PASSAGES]]
    cfg = LsrConfig(lm_score="sum")
    expected = lm_scores(tuned, [QUESTION], hits, cfg)
    plain = lm_scores(generator, [QUESTION], hits, cfg)

    set_lora_a_trainable(generator, False)  # as FFA-LoRA leaves it
    flags = {n: p.requires_grad for n, p in generator.model.named_parameters()}
    was_training = generator.model.training
    generator.model.train()  # as RALT leaves it: PEFT's load_adapter puts the model in eval mode
    try:
        with scoring_adapter(generator, str(tmp_path / "scorer")) as scorer:
            scored = lm_scores(scorer, [QUESTION], hits, cfg)
        assert torch.allclose(scored, expected, atol=1e-3), (scored, expected)
        assert not torch.allclose(scored, plain, atol=1e-2), "the scorer adapter must change the targets"
        assert torch.allclose(lm_scores(generator, [QUESTION], hits, cfg), plain, atol=1e-5)
        assert {n: p.requires_grad for n, p in generator.model.named_parameters()} == flags
        assert generator.model.training, "the train/eval mode is put back"
        assert list(generator.model.peft_config) == ["default"]
        with pytest.raises(ConfigError, match="lsr.scorer-adapter"):
            with scoring_adapter(generator, str(tmp_path / "missing")):
                pass
        assert list(generator.model.peft_config) == ["default"]
    finally:
        set_lora_a_trainable(generator, True)
        generator.model.train(was_training)


def test_closed_book_score_equals_a_hand_computation_and_the_gate_keeps_the_questions_a_passage_helps(
    generator, small_shard_path, data_dir, tmp_path
):
    """lsr.gate: a question trains LSR only when its best candidate raises the answer's likelihood above no passage
    at all; the closed-book score is the same answer log-likelihood with the passage left out of the prompt. The
    scores the test computes go through a score cache the three train_lsr runs then read (as in
    test_train_lsr_with_the_defaults_moves_the_lm_preferred_passage_up), so SmolLM2 scores each sequence once, and
    the gate's closed-book scores are shown to share it."""
    from fedrag_app.training.lsr import closed_book_scores
    from fedrag_app.training.score_cache import ScoreCache

    cfg = LsrConfig(top_k=4, lm_score="sum", learning_rate=1e-4)
    seq = build_sequence(generator.tokenizer, QUESTION.question, None, QUESTION.target, 512, label_eos=False)
    with torch.no_grad():
        logp = torch.log_softmax(generator.model(input_ids=torch.tensor([seq.input_ids])).logits[0].float(), dim=-1)
    hand = sum(logp[t - 1, tok].item() for t, tok in enumerate(seq.labels) if tok != IGNORE)
    assert closed_book_scores(generator, [QUESTION], cfg)[0].item() == pytest.approx(hand, abs=1e-3)

    train = load_web_questions("train", DataConfig(dir=str(data_dir)))
    examples = [e for e in train if e.topic in SHARD_TOPICS][:12]
    with KnowledgeStore.open(path=small_shard_path) as store, ScoreCache(tmp_path / "scores.sqlite") as cache:
        retriever = load_retriever(RetrieverConfig())
        hits = retrieve(retriever, store, [e.question for e in examples], cfg.top_k, with_vectors=True)
        best = lm_scores(generator, examples, hits, cfg, cache=cache).max(dim=1).values
        closed = closed_book_scores(generator, examples, cfg, cache=cache)
        helped = (best > closed).float().mean().item()
        margin = (best - closed).clamp(min=0).median().item()  # a margin that drops some of those a passage helps
        by_margin = (best > closed + margin).float().mean().item()
        assert 0.0 < helped < 1.0, "a sample where the gate keeps some questions and drops others"
        assert 0.0 < by_margin < helped, "the margin drops questions a passage helps by less"
        gated = train_lsr(
            generator, retriever, store, examples, LsrConfig(**{**cfg.__dict__, "gate": True}), cache=cache
        )
        plain = train_lsr(generator, load_retriever(RetrieverConfig()), store, examples, cfg, cache=cache)
        wide = LsrConfig(**{**cfg.__dict__, "gate": True, "gate_margin": margin})
        with_margin = train_lsr(generator, load_retriever(RetrieverConfig()), store, examples, wide, cache=cache)
    assert gated["lsr-scores-cached"] == 1.0, "candidates and closed-book scores alike come from the cache"
    assert gated["lsr-gate-kept"] == pytest.approx(helped)
    assert with_margin["lsr-gate-kept"] == pytest.approx(by_margin)
    assert plain["lsr-gate-kept"] == 1.0
    assert plain["lsr-candidates-kept"] == 1.0, "every question has k candidates on this shard"
    assert gated["lsr-steps"] < plain["lsr-steps"], "fewer questions, fewer steps"


def test_one_per_article_ranks_each_articles_best_passage_from_a_deeper_search(small_shard_path, data_dir):
    """lsr.one-per-article: k candidates of k distinct articles, each its article's best passage in the top 4k, in
    the retriever's order; without it, the plain top k (where one article may fill several places)."""
    from fedrag_app.training.lsr import ARTICLE_DEPTH, candidates

    train = load_web_questions("train", DataConfig(dir=str(data_dir)))
    # questions on the shard's articles (each of the 32 has 25 passages: its own fill the top 16) and others
    questions = [e.question for e in train if e.topic in SHARD_TOPICS][:4] + [e.question for e in train[:8]]
    retriever = load_retriever(RetrieverConfig())
    cfg = LsrConfig(top_k=4, one_per_article=True)
    with KnowledgeStore.open(path=small_shard_path) as store:
        plain = candidates(retriever, store, questions, LsrConfig(top_k=4))
        deep = retrieve(retriever, store, questions, 4 * ARTICLE_DEPTH, with_vectors=True)
        distinct = candidates(retriever, store, questions, cfg)
    assert any(len({h.title for h in hits}) < 4 for hits in plain), "a sample where one article fills two places"
    for hits, deeper in zip(distinct, deep):
        firsts = [h for i, h in enumerate(deeper) if h.title not in {x.title for x in deeper[:i]}]
        assert [h.id for h in hits] == [h.id for h in firsts[:4]], "fewer only where the top 4k has fewer articles"
        assert len({h.title for h in hits}) == len(hits) and all(h.vector is not None for h in hits)
    assert any(len(hits) == 4 for hits in distinct) and any(len(hits) < 4 for hits in distinct), (
        "a sample with both: train_lsr leaves out a question with fewer than k articles, as one with fewer passages"
    )
