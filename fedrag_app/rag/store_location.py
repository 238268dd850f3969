"""Where the configured knowledge store lives, and whether it is there: no torch, so a CLI can check (and fail)
before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.environment import cache_dir
from fedrag_app.core.errors import StoreError
from fedrag_app.rag.knowledge_store import MANIFEST


def store_location(cfg: AppConfig) -> dict[str, str]:
    """``{"url": ...}`` for a Qdrant server, else ``{"path": ...}``: the configured folder or a default per
    corpus+retriever."""
    if cfg.store.url:
        return {"url": cfg.store.url, "collection": cfg.store.collection}
    if cfg.store.path:
        return {"path": str(Path(cfg.store.path).expanduser().resolve())}
    corpus = Path(cfg.data.corpus).stem if cfg.data.corpus else "wikipedia"
    limit = f"-first{cfg.store.passages_limit}" if cfg.store.passages_limit else ""
    name = f"{corpus}{limit}-{Path(cfg.retriever.context_model or cfg.retriever.model).name}"
    return {"path": str(cache_dir() / "shards" / name)}


def is_default_location(cfg: AppConfig) -> bool:
    """The store is the cache's own shard (neither store.path nor store.url set): built on demand."""
    return not (cfg.store.url or cfg.store.path)


def check_store(cfg: AppConfig) -> None:
    """Fail fast, before any model loads, when the configured shard folder is missing or half-built."""
    if cfg.store.mcp_url:
        return  # an MCP server is checked when connected to
    where = store_location(cfg)
    if "path" not in where:
        return  # a server is checked when opened
    folder = Path(where["path"])
    if not (folder / MANIFEST).exists():
        raise StoreError(
            f"{folder} is not a knowledge store (no {MANIFEST}): build it with `fedrag-app index`"
            + ("" if is_default_location(cfg) else f" --store {folder}")
        )
    if not json.loads((folder / MANIFEST).read_text()).get("complete"):
        raise StoreError(
            f"store {folder} is incomplete (its build was interrupted): rebuild it with `fedrag-app index`"
        )
