"""Centralized training (`fedrag-app train`): the one-client case of the federated round, on all the data.

Writes what users load: the adapter with PEFT ``save_pretrained``, the retriever as sentence-transformers
folders, one metrics JSON line per round, and the config that produced them.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedrag_app.config.app_config import AppConfig
from fedrag_app.config.runtime import apply_runtime
from fedrag_app.core.atomic import write_json, write_text
from fedrag_app.data.loaders import excluded_mmlu_subjects, load_mmlu_pool, load_web_questions
from fedrag_app.rag.generator import load_generator, save_adapter
from fedrag_app.rag.ingest import reindex
from fedrag_app.rag.pipeline import open_store
from fedrag_app.rag.retriever import load_retriever
from fedrag_app.rag.store_location import store_location
from fedrag_app.training.local_round import run_local_round


def train_centralized(cfg: AppConfig, *, progress: bool = True) -> list[dict[str, float]]:
    """fed.num-server-rounds rounds of run_local_round over the training split; returns the per-round metrics."""
    device = apply_runtime(cfg.runtime)
    out = Path(cfg.train.output_dir).expanduser().resolve()
    gen = load_generator(cfg.generator, device=device)
    retriever = load_retriever(cfg.retriever, device=device)
    examples = load_web_questions("train", cfg.data)  # all of them: each round takes its share (round_examples)
    mmlu = load_mmlu_pool(cfg.data, excluded_mmlu_subjects(cfg)) if cfg.ralt.mmlu_ratio else []  # the mixture
    history: list[dict[str, float]] = []
    optimizer_state = {} if cfg.train.keep_optimizer_state else None  # AdamW continues across rounds, in memory
    columns = (TextColumn("training {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(cfg.train.mode, total=cfg.fed.num_server_rounds)
        for server_round in range(1, cfg.fed.num_server_rounds + 1):
            with open_store(cfg, retriever) as store:
                result = run_local_round(
                    cfg,
                    gen,
                    retriever,
                    store,
                    examples,
                    server_round=server_round,
                    optimizer_state=optimizer_state,
                    mmlu=mmlu,
                )
            if result.metrics.get("lsr-needs-reindex") and "path" in store_location(cfg):
                reindex(store_location(cfg)["path"], retriever, progress=progress)
            history.append({"round": server_round, "num-examples": result.num_examples, **result.metrics})
            write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            bar.advance(task)
    save_adapter(gen, out / "adapter")
    retriever.save(out / "retriever")
    write_json(out / "config.json", cfg.to_flat())
    return history
