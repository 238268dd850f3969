"""Partitioning real Web Questions and Wikipedia across institutions: disjoint, complete, skewed when asked."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fedrag_app.config.app_config import AppConfig, PartitionConfig
from fedrag_app.data.loaders import load_mmlu_jsonl, load_qa_jsonl, load_web_questions
from fedrag_app.federation.partition import (
    assign_articles,
    client_documents,
    client_questions,
    make_partitions,
    split_questions,
    title_key,
    topic_label,
)
from fedrag_app.rag.knowledge_store import KnowledgeStore


@pytest.fixture(scope="module")
def questions(data_dir):
    return load_web_questions("train", AppConfig().data)


def _skew(parts, labels_of) -> float:
    """Mean total-variation distance between each client's topic mix and the overall mix."""
    overall = Counter(label for part in parts for label in labels_of(part))
    total = sum(overall.values())
    distances = []
    for part in parts:
        mine = Counter(labels_of(part))
        n = sum(mine.values())
        distances.append(0.5 * sum(abs(mine[k] / n - overall[k] / total) for k in overall))
    return sum(distances) / len(distances)


def test_iid_split_is_disjoint_and_complete(questions):
    parts = split_questions(questions, PartitionConfig(num_partitions=3), seed=0)
    seen = [e.question for part in parts for e in part]
    assert len(seen) == len(set(seen)) == len(questions)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_iid_split_follows_the_seed():
    """IidPartitioner cuts contiguous blocks: without a seeded shuffle every seed would train on one split."""
    qs = load_web_questions("train", AppConfig().data)[:300]
    cfg = PartitionConfig(num_partitions=3)
    first = [[e.id for e in part] for part in split_questions(qs, cfg, seed=1)]
    assert first == [[e.id for e in part] for part in split_questions(qs, cfg, seed=1)]
    assert first != [[e.id for e in part] for part in split_questions(qs, cfg, seed=2)]
    assert first[0] != [e.id for e in qs[:100]], "not the file's first block"


def test_dirichlet_split_is_skewed_by_topic_and_keeps_an_entity_together(questions):
    labels = lambda part: [topic_label(e) for e in part]  # noqa: E731
    iid = split_questions(questions, PartitionConfig(num_partitions=3), seed=0)
    skewed = split_questions(
        questions, PartitionConfig(num_partitions=3, scheme="dirichlet", dirichlet_alpha=0.1), seed=0
    )
    assert sum(map(len, skewed)) == len(questions)
    assert _skew(skewed, labels) > 3 * _skew(iid, labels)
    by_topic = {}
    for e in questions:
        by_topic.setdefault(e.topic, set()).add(topic_label(e))
    assert all(len(v) == 1 for v in by_topic.values())


def test_each_article_has_one_owner_unless_overlap_is_asked():
    titles = [f"article {i}" for i in range(2000)]
    owners = assign_articles(titles, PartitionConfig(num_partitions=4), seed=1)
    assert all(len(o) == 1 for o in owners.values())
    assert set(Counter(o[0] for o in owners.values())) == {0, 1, 2, 3}
    shared = assign_articles(titles, PartitionConfig(num_partitions=4, doc_overlap=0.3), seed=1)
    doubles = [o for o in shared.values() if len(o) == 2]
    assert 0.25 < len(doubles) / len(titles) < 0.35 and all(o[0] != o[1] for o in doubles)


def test_articles_about_a_clients_topics_live_with_that_client_and_the_rest_as_random_puts_them():
    """Catches the old partitioner, which gave every article to a random institution: a node then retrieved its
    training contexts from a random third of the corpus (top-1 passage holds an answer for 14% of its questions,
    against 24% over the whole corpus), while centralized training saw every article."""
    titles = [f"Article {i}" for i in range(300)] + ["Chris Paul", "The Bahamas", "Los Angeles"]
    topics = [{"chris_paul"}, {"the_bahamas", "chris_paul"}, set()]
    cfg = PartitionConfig(num_partitions=3)
    owners = assign_articles(titles, cfg, seed=1, topics=topics)
    assert owners["Chris Paul"] == [0, 1] and owners["The Bahamas"] == [1]
    randomly = assign_articles(titles, PartitionConfig(num_partitions=3, documents="random"), seed=1, topics=topics)
    assert all(len(o) == 1 for o in randomly.values())
    assert {t: o for t, o in owners.items() if t not in ("Chris Paul", "The Bahamas")} == {
        t: o for t, o in randomly.items() if t not in ("Chris Paul", "The Bahamas")
    }, "an article about nobody's topic lands where the random mode puts it"
    assert title_key("Guinea-Bissau (country)") == "guinea_bissau_country"


def test_make_partitions_writes_per_client_files_shards_and_manifest(tmp_path, monkeypatch, retriever):
    from tests.test_embedding_cache import CountingEncoder

    monkeypatch.setenv("FEDRAG_CACHE_DIR", str(tmp_path / "cache"))
    cfg = AppConfig.from_flat(
        {
            "partition.num-partitions": 2,
            "partition.questions-per-client": 5,
            "partition.passages-per-client": 24,
            "partition.dir": str(tmp_path / "parts"),
        }
    )
    counting = CountingEncoder(retriever)
    manifest = make_partitions(cfg, counting, progress=False)
    assert counting.texts == len({p.id for p in _client_passages(cfg)}), "each passage encoded once, into the cache"
    other = AppConfig.from_flat({**cfg.to_flat(), "runtime.seed": 7, "partition.dir": str(tmp_path / "other")})
    rebuilt = CountingEncoder(retriever)
    make_partitions(other, rebuilt, progress=False)
    assert rebuilt.texts == len({p.id for p in _client_passages(other)} - {p.id for p in _client_passages(cfg)})
    assert json.loads((tmp_path / "parts" / "manifest.json").read_text()) == manifest
    train = [load_qa_jsonl(c["train"]) for c in manifest["clients"]]
    heldout = [load_qa_jsonl(c["heldout"]) for c in manifest["clients"]]
    assert [len(t) for t in train] == [5, 5] and all(len(h) >= 1 for h in heldout)
    all_questions = [e.question for part in train + heldout for e in part]
    assert len(all_questions) == len(set(all_questions)), "a question is in two places"
    titles = []
    for client in manifest["clients"]:
        with KnowledgeStore.open(path=client["shard"], embedding_model=retriever.name, dim=retriever.dim) as store:
            assert store.count() == client["passages"] == 24
            hits = store.search(retriever.encode_queries(["history"]).numpy()[0], 24)
            titles.append({h.title for h in hits})
    topics = [{title_key(e.topic) for e in t + h} for t, h in zip(train, heldout)]
    assert all(title_key(t) in topics[0] and title_key(t) in topics[1] for t in titles[0] & titles[1]), (
        "with doc-overlap 0 only an article both clients ask about is in both shards"
    )
    for client, mine, keys in zip(manifest["clients"], titles, topics):
        linked = {t for t in _corpus_titles(cfg) if title_key(t) in keys}
        assert client["own-topic-articles"] == len(mine & linked)
        assert not linked or mine & linked, "a client's own topics' articles come first in its shard"
    mmlu = [load_mmlu_jsonl(c["mmlu"]) for c in manifest["clients"]]
    assert abs(len(mmlu[0]) - len(mmlu[1])) <= 1 and len(mmlu[0]) > 800
    assert not {q.id for q in mmlu[0]} & {q.id for q in mmlu[1]}, "each client its own share"
    assert "global_facts" not in {q.subject for part in mmlu for q in part}, "an evaluated subject is never trained"
    assert not list(tmp_path.rglob("*.tmp"))


def _client_passages(cfg: AppConfig) -> list:
    """The passages make_partitions gives the clients (the first passages-per-client of each one's articles)."""
    from fedrag_app.data.loaders import iter_passages

    _, topics = client_questions(cfg)
    passages = list(iter_passages(cfg.data))
    return [p for mine in client_documents(passages, cfg.partition, cfg.runtime.seed, topics) for p in mine]


def _corpus_titles(cfg: AppConfig) -> set[str]:
    from fedrag_app.data.loaders import iter_passages

    return {p.title for p in iter_passages(cfg.data)}
