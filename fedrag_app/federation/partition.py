"""Split the data across simulated institutions: questions with flwr-datasets partitioners, documents by article.

Questions (Web Questions train): IID, or non-IID with a Dirichlet over a topic label derived from the data —
the question's Freebase topic key hashed into ``NUM_TOPIC_GROUPS`` groups, so all questions about one entity
share a label and a skewed Dirichlet gives each institution its own subjects. Each client keeps a held-out
split. Documents (``partition.documents``): with ``topics`` (the default) an article about the Freebase topic of
an institution's questions lives with that institution (with every one that asks about it), so a node retrieves
from the articles about its own subjects; every other article, and every article with ``random``, lives with one
institution drawn at random (optionally a second, ``doc_overlap``). Each institution gets its own Qdrant Edge
shard, built from the embedding cache: every passage the clients hold is encoded at most once per (corpus, context
encoder), whatever the seed, scheme or number of clients.
Each client also gets its share of a multiple-choice pool (MMLU dev + val, never an evaluated subject) for RALT's
training mixture (ralt.mmlu-ratio). A manifest records seeds, sizes, hashes and absolute paths. The whole output
folder is written atomically.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from fedrag_app.config.app_config import AppConfig, PartitionConfig
from fedrag_app.core import environment
from fedrag_app.core.atomic import atomic_dir, write_json
from fedrag_app.core.errors import ConfigError, DataError
from fedrag_app.data.loaders import (
    MmluQuestion,
    Passage,
    QAExample,
    corpus_path,
    excluded_mmlu_subjects,
    load_mmlu_pool,
    load_passages,
    load_web_questions,
    write_mmlu_jsonl,
    write_qa_jsonl,
)

NUM_TOPIC_GROUPS = 12
MANIFEST = "manifest.json"


def partitions_dir(cfg: PartitionConfig) -> Path:
    """Absolute output folder: partition.dir, else $FEDRAG_PARTITIONS_DIR, else ./data_partitions."""
    return environment.partitions_dir(cfg.dir)


def topic_label(example: QAExample) -> int:
    """A stable topic group per Freebase entity (same entity -> same label)."""
    return int(hashlib.sha256(example.topic.encode()).hexdigest(), 16) % NUM_TOPIC_GROUPS


def split_questions(examples: list[QAExample], cfg: PartitionConfig, seed: int) -> list[list[QAExample]]:
    """Per-client question lists via flwr-datasets' IID or Dirichlet partitioner; the split depends on the seed."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    ds = Dataset.from_dict({"idx": list(range(len(examples))), "topic": [topic_label(e) for e in examples]})
    if cfg.scheme == "iid":
        # IidPartitioner cuts contiguous blocks in dataset order: shuffled first, or every seed gets the same split
        ds = ds.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=cfg.num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=cfg.num_partitions,
            partition_by="topic",
            alpha=cfg.dirichlet_alpha,
            min_partition_size=2,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = ds
    return [[examples[i] for i in partitioner.load_partition(p)["idx"]] for p in range(cfg.num_partitions)]


def title_key(text: str) -> str:
    """An article's key, as Web Questions topic keys are written (docs/DATA.md): lowercase, spaces and hyphens to
    '_', only [a-z0-9_]."""
    return re.sub(r"[^a-z0-9_]", "", re.sub(r"[ -]", "_", text.lower()))


def assign_articles(
    titles: list[str], cfg: PartitionConfig, seed: int, topics: list[set[str]] | None = None
) -> dict[str, list[int]]:
    """title -> the client(s) that hold it. With documents = topics and `topics` (each client's question topics as
    title keys), an article about a client's topic goes to every client asking about it; the rest get one owner
    drawn at random, a second with probability doc_overlap. The draws are the same in both modes, so the
    unlinked articles land where `random` puts them."""
    rng = random.Random(seed)
    owners: dict[str, list[int]] = {}
    for title in titles:
        drawn = [rng.randrange(cfg.num_partitions)]
        if cfg.num_partitions > 1 and rng.random() < cfg.doc_overlap:
            drawn.append((drawn[0] + rng.randrange(1, cfg.num_partitions)) % cfg.num_partitions)
        key = title_key(title)
        linked = [i for i, mine in enumerate(topics or []) if key in mine] if cfg.documents == "topics" else []
        owners[title] = linked or drawn
    return owners


def kept_questions(questions: list[QAExample], cfg: PartitionConfig, seed: int) -> tuple[list, list]:
    """A client's (train, held-out) questions: its split shuffled by seed, held-out first, both truncated."""
    mine = questions[:]
    random.Random(seed).shuffle(mine)
    n_heldout = max(1, round(cfg.heldout_fraction * len(mine))) if cfg.heldout_fraction else 0
    heldout, train = mine[:n_heldout], mine[n_heldout:]
    if cfg.questions_per_client:
        train = train[: cfg.questions_per_client]
        heldout = heldout[: max(1, round(cfg.heldout_fraction * cfg.questions_per_client))] if heldout else []
    return train, heldout


def client_questions(cfg: AppConfig) -> tuple[list[tuple[list[QAExample], list[QAExample]]], list[set[str]]]:
    """Each client's kept (train, held-out) questions, and the topics they ask about as article title keys."""
    pc, seed = cfg.partition, cfg.runtime.seed
    split = split_questions(load_web_questions("train", cfg.data), pc, seed)
    kept = [kept_questions(split[i], pc, seed + i) for i in range(pc.num_partitions)]
    return kept, [{title_key(e.topic) for e in train + heldout} for train, heldout in kept]


def client_documents(
    passages: list[Passage], cfg: PartitionConfig, seed: int, topics: list[set[str]]
) -> list[list[Passage]]:
    """Each client's passages: those of the articles it holds, its own topics' articles first, then the first
    passages_per_client of them (0 = all)."""
    owners = assign_articles(sorted({p.title for p in passages}), cfg, seed, topics)
    per_client: list[list[Passage]] = [[] for _ in range(cfg.num_partitions)]
    for p in passages:
        for client in owners[p.title]:
            per_client[client].append(p)
    if cfg.documents == "topics":
        for mine, keys in zip(per_client, topics):
            mine.sort(key=lambda p: title_key(p.title) not in keys)  # stable: corpus order within each group
    return [mine[: cfg.passages_per_client] if cfg.passages_per_client else mine for mine in per_client]


def client_mmlu(cfg: AppConfig) -> list[list[MmluQuestion]]:
    """Each client's share of the multiple-choice training pool (MMLU dev + val, excluded subjects left out): the
    pool shuffled by the seed and dealt round-robin, so shares are disjoint and of equal size."""
    pool = load_mmlu_pool(cfg.data, excluded_mmlu_subjects(cfg))
    random.Random(f"mmlu-pool/{cfg.runtime.seed}").shuffle(pool)
    n = cfg.partition.num_partitions
    return [pool[i::n] for i in range(n)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_partitions(cfg: AppConfig, encoder, *, progress: bool = True) -> dict:
    """Write client-<i>/{train.jsonl, heldout.jsonl, shard/} and manifest.json under partitions_dir(cfg.partition)."""
    # Imported here: a ClientApp reads MANIFEST and partitions_dir through node_data on every message, and the
    # embedding cache imports the retriever (sentence-transformers, torch), which a query message never needs.
    from fedrag_app.rag.embedding_cache import EmbeddingCache
    from fedrag_app.rag.ingest import build_shard, encode_into_cache

    pc, seed = cfg.partition, cfg.runtime.seed
    target = partitions_dir(pc)
    foreign = {p.name for p in target.iterdir()} - {"README.md"} if target.exists() else set()
    if foreign and not (target / MANIFEST).exists():
        raise ConfigError(f"partition.dir {target} holds other files: choose an empty or earlier partition folder")
    kept, topics = client_questions(cfg)
    mmlu = client_mmlu(cfg)
    passages = load_passages(cfg.data)
    docs_of = client_documents(passages, pc, seed, topics)
    if empty := [i for i, docs in enumerate(docs_of) if not docs]:
        raise DataError(
            f"{corpus_path(cfg.data)}: its {len({p.title for p in passages})} articles leave client(s) {empty} "
            "without a passage: use fewer partition.num-partitions or a larger corpus"
        )
    cache = EmbeddingCache.open(corpus_path(cfg.data), encoder)
    batch = cfg.store.index_batch_size  # one bar (with time left) over every client's passages, each encoded once
    encode_into_cache(cache, [p for docs in docs_of for p in docs], batch_size=batch, progress=progress)
    clients = []
    readme = (target / "README.md").read_text() if (target / "README.md").exists() else None
    with atomic_dir(target) as tmp:
        for i in range(pc.num_partitions):
            folder, final = tmp / f"client-{i}", target / f"client-{i}"
            train, heldout = kept[i]
            docs = docs_of[i]
            write_qa_jsonl(folder / "train.jsonl", train)
            write_qa_jsonl(folder / "heldout.jsonl", heldout)
            write_mmlu_jsonl(folder / "mmlu.jsonl", mmlu[i])
            build_shard(docs, encoder, path=str(folder / "shard"), batch_size=batch, progress=progress, cache=cache)
            clients.append(
                {
                    "partition-id": i,
                    "train": str(final / "train.jsonl"),
                    "heldout": str(final / "heldout.jsonl"),
                    "mmlu": str(final / "mmlu.jsonl"),
                    "shard": str(final / "shard"),
                    "questions": len(train),
                    "heldout-questions": len(heldout),
                    "mmlu-questions": len(mmlu[i]),
                    "passages": len(docs),
                    "articles": len({p.title for p in docs}),
                    "own-topic-articles": len({p.title for p in docs if title_key(p.title) in topics[i]}),
                    "topics": len({e.topic for e in train}),
                    "sha256": {name: _sha256(folder / f"{name}.jsonl") for name in ("train", "heldout", "mmlu")},
                }
            )
        manifest = {
            "seed": seed,
            "scheme": pc.scheme,
            "dirichlet-alpha": pc.dirichlet_alpha,
            "num-partitions": pc.num_partitions,
            "topic-groups": NUM_TOPIC_GROUPS,
            "documents": pc.documents,
            "doc-overlap": pc.doc_overlap,
            "embedding-model": encoder.name,
            "embedding-cache": cache.key,
            "dir": str(target),
            "clients": clients,
        }
        write_json(tmp / MANIFEST, manifest)
        if readme is not None:
            (tmp / "README.md").write_text(readme)
    return manifest
