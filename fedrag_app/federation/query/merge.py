"""Merging the nodes' passage lists into one ranked list per question.

Each opted-in node returns its own top-k passages for a question (ranked by cosine score against its own shard).
The server merges the lists that arrived: reciprocal-rank fusion (a passage at 1-based rank r of a node's list
adds 1 / (k + r), summed over the lists that hold it, k = query.rrf-k; Cormack et al. 2009) or
plain score sorting (cosine scores from one encoder are comparable across shards: the score-sorted merge of every
node's exact top-k is the top-k of one index over the union). Either way a passage id appears once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NodeHit:
    """A passage as one node returned it: its cosine score and 1-based rank in that node's list."""

    id: str
    title: str
    text: str
    score: float
    rank: int
    node: int  # Flower node id of the sender
    partition: int | None = None  # the partition id the node reported, if any


@dataclass(frozen=True)
class MergedHit:
    """A merged passage: ``score`` is what it was ranked by (RRF sum or cosine); ``sources`` every list holding it."""

    id: str
    title: str
    text: str
    score: float
    sources: tuple[NodeHit, ...] = field(default=())

    def as_row(self) -> dict[str, Any]:
        best = self.sources[0]
        return {
            "id": self.id,
            "title": self.title,
            "text": self.text,
            "score": self.score,
            "node": best.node,
            "partition": best.partition,
            "node-score": best.score,
            "node-rank": best.rank,
            "nodes": [s.node for s in self.sources],
        }


def merge_rrf(lists: Sequence[Sequence[NodeHit]], k: int = 60, top: int | None = None) -> list[MergedHit]:
    """Reciprocal-rank fusion over the nodes' lists; ties broken by best cosine score, then id (deterministic)."""
    fused: dict[str, float] = {}
    sources: dict[str, list[NodeHit]] = {}
    for hits in lists:
        for hit in hits:
            fused[hit.id] = fused.get(hit.id, 0.0) + 1.0 / (k + hit.rank)
            sources.setdefault(hit.id, []).append(hit)
    return _ranked(fused, sources, top)


def merge_by_score(lists: Sequence[Sequence[NodeHit]], top: int | None = None) -> list[MergedHit]:
    """Every list's passages sorted by cosine score; a passage several nodes hold keeps its best score."""
    best: dict[str, float] = {}
    sources: dict[str, list[NodeHit]] = {}
    for hits in lists:
        for hit in hits:
            best[hit.id] = max(best.get(hit.id, -math.inf), hit.score)
            sources.setdefault(hit.id, []).append(hit)
    return _ranked(best, sources, top)


def merge(
    lists: Sequence[Sequence[NodeHit]], method: str, *, rrf_k: int = 60, top: int | None = None
) -> list[MergedHit]:
    if method == "rrf":
        return merge_rrf(lists, rrf_k, top)
    if method == "score":
        return merge_by_score(lists, top)
    raise ValueError(f"merge method must be 'rrf' or 'score', got {method!r}")


def _ranked(scores: dict[str, float], sources: dict[str, list[NodeHit]], top: int | None) -> list[MergedHit]:
    def best_first(h: NodeHit) -> tuple:
        return (-h.score, h.rank, h.node)

    order = sorted(scores, key=lambda pid: (-scores[pid], -max(s.score for s in sources[pid]), pid))
    out = []
    for pid in order[:top]:
        held = tuple(sorted(sources[pid], key=best_first))
        out.append(MergedHit(pid, held[0].title, held[0].text, scores[pid], held))
    return out
