"""`fedrag-app`: the command line. Thin: parse options into one AppConfig, call the library, print.

Every command takes the same keys as the Flower run-config: ``--config file.toml`` (a file of those keys, or a
pyproject.toml) and ``--set key=value`` (repeatable), e.g. ``fedrag-app ask "..." --set eval.top-k=4``.
User errors (FedRagAppError) print one red line and exit 1; nothing else is swallowed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fedrag_app.config import AppConfig, parse_override
from fedrag_app.errors import FedRagAppError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning of retrieval-augmented generation.")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML file of run-config keys (or a pyproject.toml)")
SetOpt = typer.Option(None, "--set", "-s", help="override one key, e.g. --set ralt.top-k=4 (repeatable)")
DataDirOpt = typer.Option(None, "--data-dir", help="local data folder laid out like shared/data (else $FEDRAG_DATA_DIR)")


def load_config(config: Optional[Path], sets: Optional[list[str]], **extra: object) -> AppConfig:
    """The CLI's one road to an AppConfig: file, then --set overrides, then command options."""
    overrides = dict(parse_override(s) for s in sets or [])
    overrides.update({k: v for k, v in extra.items() if v is not None})
    if config is not None:
        return AppConfig.from_toml(config, overrides)
    return AppConfig.from_flat(overrides, source="--set")


def _quiet_libraries() -> None:
    """Our progress bars are the ones that matter; the libraries' own per-load bars are noise here."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _models(cfg: AppConfig, *, generator: bool = True):
    from fedrag_app.generator import load_generator
    from fedrag_app.retriever import load_retriever
    from fedrag_app.runtime import apply_runtime

    device = apply_runtime(cfg.runtime)
    with console.status("loading models"):
        retriever = load_retriever(cfg.retriever, device=device)
        gen = load_generator(cfg.generator, device=device) if generator else None
    return gen, retriever


@app.command()
def index(
    corpus: Optional[Path] = typer.Argument(None, help="passages JSONL (id/title/text) or a folder holding passages.jsonl"),
    limit: Optional[int] = typer.Option(None, help="index only the first N passages"),
    store: Optional[str] = typer.Option(None, help="shard folder to write (default: in the cache, per corpus+retriever)"),
    rebuild: bool = typer.Option(False, help="re-index even if the shard exists (swapped in atomically)"),
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    data_dir: Optional[str] = DataDirOpt,
) -> None:
    """Encode a passage corpus and build a Qdrant shard (embedded Qdrant Edge by default).

    Vectors go through the embedding cache: an interrupted index resumes from what was already encoded, and a
    rebuild (or another shard of the same corpus) encodes nothing again.
    """
    from fedrag_app.data import load_passages
    from fedrag_app.knowledge_store import KnowledgeStore
    from fedrag_app.rag import build_store, store_location

    if corpus is not None and corpus.is_dir():
        corpus = corpus / "passages.jsonl"
    cfg = load_config(config, sets, **{"data.corpus": str(corpus.resolve()) if corpus else None,
                                       "store.passages-limit": limit, "store.path": store, "data.dir": data_dir})
    where = store_location(cfg)
    if "path" in where and Path(where["path"]).exists() and not rebuild:
        _, retriever = _models(cfg, generator=False)
        with KnowledgeStore.open(**where, embedding_model=retriever.name, dim=retriever.dim) as kb:
            console.print(f"[green]already indexed[/] {kb.count()} passages in {where['path']} (--rebuild to redo)")
        return
    with console.status("reading the corpus"):
        passages = load_passages(cfg.data, limit=cfg.store.passages_limit)  # counted (and checked) before any model loads
    _, retriever = _models(cfg, generator=False)
    stats = build_store(cfg, retriever, passages=passages, progress=True, replace=rebuild)
    console.print(f"[green]indexed[/] {stats} -> {where.get('path') or where.get('url')}")


@app.command()
def ask(
    question: str = typer.Argument(..., help="the question"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="passages to retrieve (0 = closed book)"),
    adapter: Optional[str] = typer.Option(None, help="PEFT adapter folder from `train` or a checkpoint"),
    retriever_path: Optional[str] = typer.Option(None, "--retriever", help="retriever folder from `train` or a checkpoint"),
    store: Optional[str] = typer.Option(None, help="shard folder (default: the one `index` built)"),
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
) -> None:
    """Answer one question from retrieved passages; print the answer and the passages used."""
    from fedrag_app.generator import load_generator
    from fedrag_app.rag import RagPipeline, check_store, open_store
    from fedrag_app.retriever import load_retriever
    from fedrag_app.runtime import apply_runtime

    cfg = load_config(config, sets, **{"eval.top-k": top_k, "store.path": store, "generator.adapter-path": adapter})
    if cfg.eval.top_k:
        check_store(cfg)  # a missing store fails here, not after ~20 s of model loading
    device = apply_runtime(cfg.runtime)
    with console.status("loading models and store"):
        retriever = load_retriever(cfg.retriever, device=device, path=retriever_path)
        gen = load_generator(cfg.generator, device=device)
        kb = open_store(cfg, retriever) if cfg.eval.top_k else None
    try:
        result = RagPipeline(gen, retriever, kb, cfg.eval.top_k).answer([question], max_new_tokens=cfg.generator.max_new_tokens)[0]
    finally:
        if kb is not None:
            kb.close()
    console.print(f"[bold]Q:[/] {question}\n[bold green]A:[/] {result.answer}")
    if result.hits:
        table = Table("#", "score", "title", "passage", title="retrieved passages")
        for i, hit in enumerate(result.hits, 1):
            table.add_row(str(i), f"{hit.score:.3f}", hit.title, hit.text[:100] + ("…" if len(hit.text) > 100 else ""))
        console.print(table)


@app.command()
def train(
    mode: Optional[str] = typer.Option(None, help="ralt | lsr | ra-dit (train.mode)"),
    output: Optional[str] = typer.Option(None, help="output folder (train.output-dir)"),
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    data_dir: Optional[str] = DataDirOpt,
) -> None:
    """Centralized training: fed.num-server-rounds rounds of the same local round a federated client runs."""
    from fedrag_app.training_run import train_centralized

    cfg = load_config(config, sets, **{"train.mode": mode, "train.output-dir": output, "data.dir": data_dir})
    history = train_centralized(cfg, progress=True)
    table = Table("round", *[k for k in history[-1] if k.endswith(("loss-first", "loss-last", "seconds"))], title="training")
    for row in history:
        table.add_row(str(row["round"]), *[f"{v:.4g}" for k, v in row.items() if k.endswith(("loss-first", "loss-last", "seconds"))])
    console.print(table)
    out = Path(cfg.train.output_dir).resolve()
    console.print(f"[green]wrote[/] {out}/adapter (PEFT), {out}/retriever (sentence-transformers), {out}/metrics.jsonl")


@app.command()
def evaluate(
    adapter: Optional[str] = typer.Option(None, help="PEFT adapter folder (default: the untrained LoRA = the base model)"),
    retriever_path: Optional[str] = typer.Option(None, "--retriever", help="retriever folder from `train` or a checkpoint"),
    no_retrieval: bool = typer.Option(False, "--no-retrieval", help="closed-book baseline"),
    output: Optional[Path] = typer.Option(None, help="write the results as JSON here"),
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    data_dir: Optional[str] = DataDirOpt,
) -> None:
    """MMLU (letter log-likelihood and generation), Web Questions EM/F1, retrieval recall@k and MRR."""
    from fedrag_app.atomic import write_json
    from fedrag_app.evaluate import format_table, run_evaluation
    from fedrag_app.generator import load_generator
    from fedrag_app.rag import open_store
    from fedrag_app.retriever import load_retriever
    from fedrag_app.runtime import apply_runtime

    cfg = load_config(config, sets, **{"generator.adapter-path": adapter, "data.dir": data_dir,
                                       "eval.use-retrieval": False if no_retrieval else None})
    device = apply_runtime(cfg.runtime)
    with console.status("loading models and store"):
        gen = load_generator(cfg.generator, device=device)
        retriever = load_retriever(cfg.retriever, device=device, path=retriever_path) if cfg.eval.use_retrieval else None
        kb = open_store(cfg, retriever) if retriever is not None else None
    try:
        with console.status("evaluating"):
            results = run_evaluation(cfg, gen, retriever, kb)
    finally:
        if kb is not None:
            kb.close()
    console.print(format_table(results))
    if output is not None:
        write_json(output, {"results": results, "config": cfg.to_flat()})
        console.print(f"[green]wrote[/] {output}")


@app.command()
def partition(
    num_partitions: Optional[int] = typer.Option(None, "--num-partitions", "-n", help="institutions (partition.num-partitions)"),
    scheme: Optional[str] = typer.Option(None, help="iid | dirichlet (partition.scheme)"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder (partition.dir; default ./data_partitions)"),
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    data_dir: Optional[str] = DataDirOpt,
) -> None:
    """Split questions (flwr-datasets) and articles across institutions and build one Qdrant shard each."""
    from fedrag_app.partition import make_partitions

    cfg = load_config(config, sets, **{"partition.num-partitions": num_partitions, "partition.scheme": scheme,
                                       "partition.dir": str(Path(out).resolve()) if out else None, "data.dir": data_dir})
    _, retriever = _models(cfg, generator=False)
    manifest = make_partitions(cfg, retriever, progress=True)
    table = Table("client", "questions", "held-out", "topics", "articles", "passages", title=f"{manifest['scheme']} partitions")
    for c in manifest["clients"]:
        table.add_row(str(c["partition-id"]), str(c["questions"]), str(c["heldout-questions"]), str(c["topics"]),
                      str(c["articles"]), str(c["passages"]))
    console.print(table)
    console.print(f"[green]wrote[/] {manifest['dir']}/manifest.json")


def main() -> None:
    _quiet_libraries()
    try:
        app()
    except FedRagAppError as e:
        err_console.print(f"[bold red]error:[/] {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
