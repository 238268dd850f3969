"""How good are a node's training contexts under each document placement? (issue 21, docs/FEDERATION.md section 1.)

    PYTHONPATH=. python benchmarks/partition_contexts.py            # 32 s on 2 cores with a warm embedding cache

For the quality table's federated partitions (3 institutions, 200 training questions each, the full corpus), IID and
Dirichlet, under partition.documents = random and = topics: the share of each node's training questions whose top-1
passage from the node's own articles holds a gold answer (case-insensitive substring), beside the same figure over
the whole corpus, which a centralized run retrieves from. Uses the untuned retriever and the embedding cache (the
first run encodes the corpus); builds no shard.
"""

from __future__ import annotations

import numpy as np

from fedrag_app.config.app_config import AppConfig
from fedrag_app.data.loaders import corpus_path, load_passages
from fedrag_app.federation.partition import client_documents, client_questions
from fedrag_app.rag.embedding_cache import EmbeddingCache
from fedrag_app.rag.retriever import load_retriever

TABLE = {
    "partition.num-partitions": 3,
    "partition.questions-per-client": 200,
    "partition.passages-per-client": 0,
    "partition.heldout-fraction": 0.05,
}


def top1_holds_answer(scores: np.ndarray, answers: list[str], texts: list[str]) -> bool:
    return any(a.lower() in texts[int(np.argmax(scores))] for a in answers)


def main() -> None:
    base = AppConfig.from_flat(TABLE)
    retriever = load_retriever(base.retriever)
    passages = load_passages(base.data)
    row_of = {p.id: i for i, p in enumerate(passages)}
    vectors = EmbeddingCache.open(corpus_path(base.data), retriever).vectors(passages)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = [p.text.lower() for p in passages]
    print("| scheme | documents | questions | top-1 holds an answer: own shard | whole corpus |")
    print("|---|---|---|---|---|")
    for scheme in ("iid", "dirichlet"):
        for documents in ("random", "topics"):
            cfg = AppConfig.from_flat({**TABLE, "partition.scheme": scheme, "partition.documents": documents})
            kept, topics = client_questions(cfg)
            own_hits = whole_hits = n = 0
            for (train, _), docs in zip(kept, client_documents(passages, cfg.partition, cfg.runtime.seed, topics)):
                mine = np.zeros(len(passages), dtype=bool)
                mine[[row_of[p.id] for p in docs]] = True
                queries = retriever.encode_queries([q.question for q in train]).numpy()
                scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ vectors.T
                for q, s in zip(train, scores):
                    whole_hits += top1_holds_answer(s, q.answers, texts)
                    own_hits += top1_holds_answer(np.where(mine, s, -np.inf), q.answers, texts)
                    n += 1
            print(f"| {scheme} | {documents} | {n} | {own_hits / n:.3f} | {whole_hits / n:.3f} |")


if __name__ == "__main__":
    main()
