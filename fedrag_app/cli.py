"""`fedrag-app`: the command line. Thin: parse options into one AppConfig, call the library, print.

Every command takes the same keys as the Flower run-config: ``--config file.toml`` (a file of those keys, or a
pyproject.toml) and ``--set key=value`` (repeatable), e.g. ``fedrag-app ask "..." --set eval.top-k=4``.
User errors (FedRagAppError) print one red line and exit 1; nothing else is swallowed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedrag_app.config.app_config import AppConfig, parse_override, toml_keys
from fedrag_app.core import environment
from fedrag_app.core.errors import FedRagAppError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated fine-tuning of retrieval-augmented generation."
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML file of run-config keys (or a pyproject.toml)")
SetOpt = typer.Option(None, "--set", "-s", help="override one key, e.g. --set ralt.top-k=4 (repeatable)")
DataDirOpt = typer.Option(None, "--data-dir", help="local data folder (docs/DATA.md; else $FEDRAG_DATA_DIR)")


def given_keys(config: Path | None, sets: list[str] | None, **extra: object) -> dict[str, object]:
    """The run-config keys a command was given, without the defaults: --config's, then --set, then its options."""
    keys = toml_keys(config) if config is not None else {}
    keys.update(parse_override(s) for s in sets or [])
    keys.update({k: v for k, v in extra.items() if v is not None})
    return keys


def load_config(config: Path | None, sets: list[str] | None, **extra: object) -> AppConfig:
    """The CLI's one road to an AppConfig: file, then --set overrides, then command options."""
    return AppConfig.from_flat(given_keys(config, sets, **extra), source=str(config) if config is not None else "--set")


@app.callback()
def _root(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        envvar=environment.VERBOSE,
        help="show library warnings and progress bars (quiet by default)",
    ),
) -> None:
    """Federated fine-tuning of retrieval-augmented generation."""
    from fedrag_app.core.verbosity import configure

    configure(verbose)


def _models(cfg: AppConfig, *, generator: bool = True):
    from fedrag_app.config.runtime import apply_runtime
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.retriever import load_retriever

    device = apply_runtime(cfg.runtime)
    with console.status("loading models"):
        retriever = load_retriever(cfg.retriever, device=device)
        gen = load_generator(cfg.generator, device=device) if generator else None
    return gen, retriever


@app.command()
def index(
    corpus: Path | None = typer.Argument(
        None, help="passages JSONL (id/title/text) or a folder holding passages.jsonl"
    ),
    limit: int | None = typer.Option(None, help="index only the first N passages"),
    store: str | None = typer.Option(None, help="shard folder to write (default: in the cache, per corpus+retriever)"),
    rebuild: bool = typer.Option(False, help="re-index even if the shard exists (swapped in atomically)"),
    config: Path | None = ConfigOpt,
    sets: list[str] | None = SetOpt,
    data_dir: str | None = DataDirOpt,
) -> None:
    """Encode a passage corpus and build a Qdrant shard (embedded Qdrant Edge by default).

    Vectors go through the embedding cache: an interrupted index resumes from what was already encoded, and a
    rebuild (or another shard of the same corpus) encodes nothing again.
    """
    if corpus is not None and corpus.is_dir():
        corpus = corpus / "passages.jsonl"
    cfg = load_config(
        config,
        sets,
        **{
            "data.corpus": str(corpus.resolve()) if corpus else None,
            "store.passages-limit": limit,
            "store.path": store,
            "data.dir": data_dir,
        },
    )
    from fedrag_app.data.loaders import load_passages  # after the config is validated, as in `ask`
    from fedrag_app.rag.knowledge_store import KnowledgeStore
    from fedrag_app.rag.store_location import store_location

    where = store_location(cfg)
    if "path" in where and Path(where["path"]).exists() and not rebuild:
        _, retriever = _models(cfg, generator=False)
        with KnowledgeStore.open(**where, embedding_model=retriever.name, dim=retriever.dim) as kb:
            console.print(f"[green]already indexed[/] {kb.count()} passages in {where['path']} (--rebuild to redo)")
        return
    with console.status("reading the corpus"):
        passages = load_passages(
            cfg.data, limit=cfg.store.passages_limit
        )  # counted (and checked) before any model loads
    from fedrag_app.rag.pipeline import build_store  # torch: only once the corpus has been read and checked

    _, retriever = _models(cfg, generator=False)
    stats = build_store(cfg, retriever, passages=passages, progress=True, replace=rebuild)
    console.print(f"[green]indexed[/] {stats} -> {where.get('path') or where.get('url')}")


@app.command()
def ask(
    question: str | None = typer.Argument(
        None,
        help="the question; none: read questions from stdin, one a line, until an empty line or EOF (models load once)",
    ),
    top_k: int | None = typer.Option(None, "--top-k", help="passages to retrieve (0 = closed book)"),
    adapter: str | None = typer.Option(None, help="PEFT adapter folder from `train` or a checkpoint"),
    retriever_path: str | None = typer.Option(
        None, "--retriever", help="retriever folder from `train` or a checkpoint"
    ),
    store: str | None = typer.Option(None, help="shard folder (default: the one `index` built)"),
    federation: str | None = typer.Option(
        None,
        help="ask across a federation's shards instead: a flwr connection "
        "(SuperLink address + credentials, e.g. 'local' or one added by "
        "deploy/fedrag_deploy.py connection)",
    ),
    federation_config: str = typer.Option("", help="with --federation local: e.g. 'num-supernodes=3'"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per answer (question, answer, passages)"),
    config: Path | None = ConfigOpt,
    sets: list[str] | None = SetOpt,
) -> None:
    """Answer a question from retrieved passages (or many, from stdin); print the answer and the passages used."""
    if federation:
        if question is None:
            raise typer.BadParameter("--federation answers one question given as an argument", param_hint="QUESTION")
        cfg = load_config(config, sets, **{"eval.top-k": top_k, "generator.adapter-path": adapter})
        return ask_federation(
            question, federation, federation_config, cfg, local=retriever_path or store, as_json=as_json
        )
    cfg = load_config(config, sets, **{"eval.top-k": top_k, "store.path": store, "generator.adapter-path": adapter})
    from fedrag_app.rag.store_location import check_store

    if cfg.eval.top_k:
        check_store(cfg)  # a missing store fails here, not after ~20 s of model loading
    # imported after the config and the store are checked: bad input fails in a fraction of a second, not after
    # torch/peft load
    from fedrag_app.config.runtime import apply_runtime
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.pipeline import RagPipeline, open_store
    from fedrag_app.rag.retriever import load_retriever

    device = apply_runtime(cfg.runtime)
    with console.status("loading models and store"):
        retriever = load_retriever(cfg.retriever, device=device, path=retriever_path)
        gen = load_generator(cfg.generator, device=device)
        kb = open_store(cfg, retriever) if cfg.eval.top_k else None
    try:
        pipeline = RagPipeline(gen, retriever, kb, cfg.eval.top_k)
        for q in [question] if question is not None else _stdin_questions(as_json):
            result = pipeline.answer([q], max_new_tokens=cfg.generator.max_new_tokens)[0]
            print_answer(result, as_json)
    finally:
        if kb is not None:
            kb.close()


def _stdin_questions(quiet: bool):
    """Questions from stdin, one a line, until an empty line or EOF; a prompt when a person is typing."""
    interactive = sys.stdin.isatty() and not quiet
    if interactive:
        err_console.print("[dim]one question a line; an empty line or Ctrl-D ends[/]")
    while True:
        if interactive:
            err_console.print("[bold]?[/] ", end="")
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.strip()


def print_answer(result, as_json: bool) -> None:
    """The answer and its passages: a JSON line for scripts, or text and a table for people."""
    if as_json:
        passages = [
            {"rank": i, "id": h.id, "score": h.score, "title": h.title, "text": h.text}
            for i, h in enumerate(result.hits, 1)
        ]
        print(json.dumps({"question": result.question, "answer": result.answer, "passages": passages}), flush=True)
        return
    console.print(f"[bold]Q:[/] {result.question}\n[bold green]A:[/] {result.answer}")
    if result.hits:
        table = Table("#", "score", "title", "passage", title="retrieved passages")
        for i, hit in enumerate(result.hits, 1):
            table.add_row(str(i), f"{hit.score:.3f}", hit.title, hit.text[:100] + ("…" if len(hit.text) > 100 else ""))
        console.print(table)


def ask_federation(
    question: str, connection: str, federation_config: str, cfg: AppConfig, local: str | None, as_json: bool = False
) -> None:
    """`ask --federation`: a query run (fed.task = "query") with the keys that differ from the defaults (--adapter is
    a path on the SuperLink's host; the retriever comes from query.checkpoint, the passages from the nodes). With
    --json, one JSON object: question, answer, passages (with node and partition), run-id, metrics."""
    from fedrag_app.core.errors import ConfigError
    from fedrag_app.federation.ask import ask_federation as run

    if local:
        raise ConfigError(
            f"--retriever/--store {local!r} do not apply with --federation: the nodes search their own "
            "shards; use --set query.checkpoint=<round folder or 'latest'> for a trained retriever"
        )
    overrides = cfg.changed()
    with (err_console if as_json else console).status(
        f"asking the federation '{connection}' (flwr run, fed.task='query')"
    ):
        result = run(question, connection, overrides, federation_config=federation_config)
    if as_json:
        passages = [{"rank": i, **p} for i, p in enumerate(result["passages"], 1)]
        reply = {"question": question, "answer": result["answer"], "passages": passages}
        print(json.dumps({**reply, "run-id": result["run-id"], "metrics": result["metrics"]}), flush=True)
        return
    console.print(f"[bold]Q:[/] {question}\n[bold green]A:[/] {result['answer']}")
    table = Table(
        "#", "score", "node", "partition", "title", "passage", title=f"merged passages (run {result['run-id']})"
    )
    for i, p in enumerate(result["passages"], 1):
        table.add_row(str(i), f"{p['score']:.4f}", str(p["node"]), str(p["partition"]), p["title"], p["text"][:100])
    console.print(table)
    m = result["metrics"]
    console.print(
        f"nodes {m.get('nodes')}: {m.get('replies-ok')} answered, {m.get('replies-refused')} refused, "
        f"{m.get('replies-error', 0) + m.get('replies-invalid', 0)} failed, {m.get('replies-timeout')} late"
    )


@app.command()
def train(
    mode: str | None = typer.Option(None, help="ralt | lsr | ra-dit (train.mode)"),
    output: str | None = typer.Option(None, help="output folder (train.output-dir)"),
    config: Path | None = ConfigOpt,
    sets: list[str] | None = SetOpt,
    data_dir: str | None = DataDirOpt,
) -> None:
    """Centralized training: fed.num-server-rounds rounds of the same local round a federated client runs."""
    from fedrag_app.training.centralized import train_centralized

    cfg = load_config(config, sets, **{"train.mode": mode, "train.output-dir": output, "data.dir": data_dir})
    history = train_centralized(cfg, progress=True)
    table = Table(
        "round", *[k for k in history[-1] if k.endswith(("loss-first", "loss-last", "seconds"))], title="training"
    )
    for row in history:
        table.add_row(
            str(row["round"]),
            *[f"{v:.4g}" for k, v in row.items() if k.endswith(("loss-first", "loss-last", "seconds"))],
        )
    console.print(table)
    out = Path(cfg.train.output_dir).resolve()
    console.print(f"[green]wrote[/] {out}/adapter (PEFT), {out}/retriever (sentence-transformers), {out}/metrics.jsonl")


@app.command()
def evaluate(
    adapter: str | None = typer.Option(None, help="PEFT adapter folder (default: the untrained LoRA = the base model)"),
    retriever_path: str | None = typer.Option(
        None, "--retriever", help="retriever folder from `train` or a checkpoint"
    ),
    no_retrieval: bool = typer.Option(False, "--no-retrieval", help="closed-book baseline"),
    output: Path | None = typer.Option(None, help="write the results as JSON here"),
    predictions: Path | None = typer.Option(
        None, help="write one JSON line per question here (id, question, gold, answer, scores, retrieved ids)"
    ),
    config: Path | None = ConfigOpt,
    sets: list[str] | None = SetOpt,
    data_dir: str | None = DataDirOpt,
) -> None:
    """MMLU (eval.mmlu-protocols: letter, generated letter, circular, cloze), Web Questions EM/F1, retrieval
    recall@k and MRR."""
    from fedrag_app.config.runtime import apply_runtime
    from fedrag_app.core.atomic import write_json
    from fedrag_app.evaluation.evaluate import format_table, run_evaluation, write_predictions
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.pipeline import open_store
    from fedrag_app.rag.retriever import load_retriever

    cfg = load_config(
        config,
        sets,
        **{
            "generator.adapter-path": adapter,
            "data.dir": data_dir,
            "eval.use-retrieval": False if no_retrieval else None,
        },
    )
    device = apply_runtime(cfg.runtime)
    with console.status("loading models and store"):
        gen = load_generator(cfg.generator, device=device)
        retriever = (
            load_retriever(cfg.retriever, device=device, path=retriever_path) if cfg.eval.use_retrieval else None
        )
        kb = open_store(cfg, retriever) if retriever is not None else None
    try:
        with console.status("evaluating"):
            records: list[dict] = []
            results = run_evaluation(cfg, gen, retriever, kb, records=records)
    finally:
        if kb is not None:
            kb.close()
    console.print(format_table(results))
    if predictions is not None:
        write_predictions(predictions, records)
        console.print(f"[green]wrote[/] {predictions} ({len(records)} questions)")
    if output is not None:
        write_json(output, {"results": results, "config": cfg.to_flat()})
        console.print(f"[green]wrote[/] {output}")


@app.command()
def partition(
    num_partitions: int | None = typer.Option(
        None, "--num-partitions", "-n", help="institutions (partition.num-partitions)"
    ),
    scheme: str | None = typer.Option(None, help="iid | dirichlet (partition.scheme)"),
    out: str | None = typer.Option(None, "--out", help="output folder (partition.dir; default ./data_partitions)"),
    config: Path | None = ConfigOpt,
    sets: list[str] | None = SetOpt,
    data_dir: str | None = DataDirOpt,
) -> None:
    """Split questions (flwr-datasets) and articles across institutions and build one Qdrant shard each."""
    from fedrag_app.federation.partition import make_partitions

    cfg = load_config(
        config,
        sets,
        **{
            "partition.num-partitions": num_partitions,
            "partition.scheme": scheme,
            "partition.dir": str(Path(out).resolve()) if out else None,
            "data.dir": data_dir,
        },
    )
    _, retriever = _models(cfg, generator=False)
    manifest = make_partitions(cfg, retriever, progress=True)
    table = Table(
        "client",
        "questions",
        "held-out",
        "topics",
        "articles",
        "on its topics",
        "passages",
        title=f"{manifest['scheme']} partitions, {manifest['documents']} documents",
    )
    for c in manifest["clients"]:
        table.add_row(
            str(c["partition-id"]),
            str(c["questions"]),
            str(c["heldout-questions"]),
            str(c["topics"]),
            str(c["articles"]),
            str(c["own-topic-articles"]),
            str(c["passages"]),
        )
    console.print(table)
    console.print(f"[green]wrote[/] {manifest['dir']}/manifest.json")


@app.command()
def export(
    checkpoint: Path = typer.Option(
        ...,
        "--checkpoint",
        help="a round-NNNN folder, a federated output folder (its latest round) or a `fedrag-app train` output",
    ),
    out: Path = typer.Option(
        ..., "--out", help="folder to write: generator/, retriever/, context-encoder/, manifest.json"
    ),
    force: bool = typer.Option(False, "--force", help="replace --out if it is not empty"),
    config: Path | None = ConfigOpt,
    sets: list[str] | None = SetOpt,
) -> None:
    """The global adapter merged into the base LM (transformers folder), the retriever (sentence-transformers), a
    manifest. The checkpoint's own run-config applies; --config/--set override its keys (e.g. --set
    generator.model=<folder> where the base model lives elsewhere on this machine)."""
    from fedrag_app.commands.export import export_checkpoint

    overrides = given_keys(config, sets)
    with console.status("merging the adapter into the base model"):
        manifest = export_checkpoint(checkpoint, out, overwrite=force, overrides=overrides)
    out = out.expanduser().resolve()
    console.print(
        f"[green]exported[/] {manifest['checkpoint']} -> {out}\n"
        f"  generator/        AutoModelForCausalLM.from_pretrained('{out}/generator') (or vLLM)\n"
        f"  retriever/        SentenceTransformer('{out}/retriever'): encodes questions\n"
        f"  context-encoder/  SentenceTransformer: embedded the store's passages\n"
        f"  manifest.json     checkpoint, base models, store, embedding fingerprint"
    )


@app.command()
def quickstart(
    out: Path = typer.Option(Path("outputs/quickstart"), "--out", help="folder for indexes, checkpoints, metrics"),
    rounds: int | None = typer.Option(None, "--rounds", help="federated rounds (fed.num-server-rounds; default 3)"),
    question: str | None = typer.Option(None, "--question", help="what to ask the fine-tuned system at the end"),
    config: Path | None = ConfigOpt,
    sets: list[str] | None = SetOpt,
    data_dir: str | None = DataDirOpt,
) -> None:
    """The main job on embedded defaults (`make run`): index, federated RALT over 3 institutions (`flwr run`) with
    the server evaluating before and after, ask. --config/--set override the embedded defaults."""
    from fedrag_app.commands.quickstart import QUESTION, Quickstart

    overrides = given_keys(config, sets, **{"fed.num-server-rounds": rounds})
    try:
        Quickstart(overrides, out=out, question=question or QUESTION, data_dir=data_dir, console=console).run()
    except KeyboardInterrupt:
        err_console.print(
            "[yellow]interrupted[/]: the local SuperLink and its simulation were stopped; finished "
            "indexes are kept for the next run"
        )
        raise typer.Exit(130) from None


AdapterOpt = typer.Option(None, help="PEFT adapter folder from `train` or a checkpoint")
RetrieverOpt = typer.Option(None, "--retriever", help="retriever folder from `train` or a checkpoint")
StoreOpt = typer.Option(None, help="shard folder (default: the one `index` built)")
NameOpt = typer.Option("fedrag", "--name", help="the model name clients see and ask for")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    top_k: int | None = typer.Option(None, "--top-k", help="default passages per question (0 = closed book)"),
    adapter: str | None = AdapterOpt,
    retriever_path: str | None = RetrieverOpt,
    store: str | None = StoreOpt,
    name: str = NameOpt,
    config: Path | None = ConfigOpt,
    sets: list[str] | None = SetOpt,
) -> None:
    """Serve the RAG system over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health; the
    passages used come back in the reply's `passages` field) and as an MCP server at /mcp. Models load once."""
    cfg = load_config(config, sets, **{"eval.top-k": top_k, "store.path": store, "generator.adapter-path": adapter})
    from fedrag_app.commands.serve import serve_http

    serve_http(cfg, retriever_path=retriever_path, name=name, host=host, port=port, console=console)


@app.command()
def mcp(
    transport: str = typer.Option("stdio", help="stdio (for a client that starts this command) or http"),
    host: str = typer.Option("127.0.0.1", help="with --transport http: address to listen on"),
    port: int = typer.Option(8001, help="with --transport http: port (the endpoint is /mcp)"),
    top_k: int | None = typer.Option(None, "--top-k", help="default passages for `ask` (0 = closed book)"),
    adapter: str | None = AdapterOpt,
    retriever_path: str | None = RetrieverOpt,
    store: str | None = StoreOpt,
    name: str = NameOpt,
    federation: str | None = typer.Option(
        None,
        "--federation",
        help="the operator's side: answer each tool call with a query run across this flwr connection's opted-in "
        "institutions (tens of seconds a call) instead of a local shard",
    ),
    federation_config: str = typer.Option("", help="with --federation local: e.g. 'num-supernodes=3'"),
    config: Path | None = ConfigOpt,
    sets: list[str] | None = SetOpt,
) -> None:
    """Serve a shard and the RAG system as an MCP server: tools `search` (query, k -> passages with ids, titles,
    scores) and `ask` (question -> answer + sources); with --federation, every institution's shards."""
    cfg = load_config(config, sets, **{"eval.top-k": top_k, "store.path": store, "generator.adapter-path": adapter})
    from fedrag_app.commands.serve import serve_mcp

    serve_mcp(
        cfg,
        retriever_path=retriever_path,
        name=name,
        transport=transport,
        host=host,
        port=port,
        console=err_console,
        federation=(federation, federation_config) if federation else None,
    )


def main() -> None:
    if "--verbose" in sys.argv[2:]:  # `fedrag-app ask "…" --verbose` works like `fedrag-app --verbose ask "…"`
        sys.argv.remove("--verbose")
        sys.argv.insert(1, "--verbose")
    try:
        app()
    except FedRagAppError as e:
        err_console.print(f"[bold red]error:[/] {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
