"""`fedrag-app serve` (OpenAI-compatible HTTP) and `fedrag-app mcp` (MCP over stdio or streamable HTTP): load the
system once, as `ask` does for the same options, then hand it to the bridge's server until it is stopped."""

from __future__ import annotations

import sys

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.errors import ConfigError

TRANSPORTS = ("stdio", "http")


def load_service(cfg: AppConfig, *, retriever_path: str | None, name: str, status):
    """The models and store `ask` would load; ``status`` is a rich console for the loading message (stderr for MCP
    over stdio, where stdout is the protocol's)."""
    from fedrag_app.bridges.service import RagService
    from fedrag_app.rag.store_location import check_store

    if cfg.eval.top_k:
        check_store(cfg)  # a missing store fails before the models load
    with status.status("loading models and store"):
        return RagService.load(cfg, retriever_path=retriever_path, name=name)


def serve_http(cfg: AppConfig, *, retriever_path: str | None, name: str, host: str, port: int, console) -> None:
    import uvicorn

    from fedrag_app.bridges.http_server import build_app

    service = load_service(cfg, retriever_path=retriever_path, name=name, status=console)
    console.print(
        f"[green]serving[/] model {name!r} at http://{host}:{port}/v1 (OpenAI-compatible; /health, /v1/models) "
        f"and MCP at http://{host}:{port}/mcp"
    )
    try:
        uvicorn.run(build_app(service, host=host), host=host, port=port, log_level="warning")
    finally:
        service.close()


def federated_service(cfg: AppConfig, connection: str, federation_config: str, *, local: str | None, name: str):
    """The operator's side: each call a query run across the connection's institutions (they search their own
    shards, so a local --retriever/--store does not apply)."""
    from fedrag_app.bridges.federated import FederatedService

    if local:
        raise ConfigError(
            f"--retriever/--store {local!r} do not apply with --federation: the nodes search their own shards; use "
            "--set query.checkpoint=<round folder or 'latest'> for a trained retriever"
        )
    return FederatedService(
        connection,
        federation_config,
        cfg.changed(),
        top_k=cfg.eval.top_k or 5,
        max_new_tokens=cfg.generator.max_new_tokens,
        top_k_per_node=cfg.query.top_k_per_node,
        name=name,
    )


def serve_mcp(
    cfg: AppConfig,
    *,
    retriever_path: str | None,
    name: str,
    transport: str,
    host: str,
    port: int,
    console,
    federation: tuple[str, str] | None = None,
) -> None:
    """``federation``: (flwr connection, federation-config) to serve the federation's shards instead of a local one."""
    if transport not in TRANSPORTS:
        raise ConfigError(f"--transport {transport!r}: use one of {', '.join(TRANSPORTS)}")
    from fedrag_app.bridges.mcp_server import build_mcp_server

    if federation:
        local = retriever_path or cfg.store.path or None
        service = federated_service(cfg, *federation, local=local, name=name)
    else:
        service = load_service(cfg, retriever_path=retriever_path, name=name, status=console)
    server = build_mcp_server(service, name)
    try:
        if transport == "stdio":
            where = f"the federation {federation[0]!r}" if federation else "a local shard"
            print(f"MCP server {name!r} on stdio over {where} (tools: search, ask)", file=sys.stderr, flush=True)
            server.run("stdio")
        else:
            console.print(f"[green]MCP server[/] {name!r} at http://{host}:{port}/mcp (streamable HTTP)")
            server.run("streamable-http", host=host, port=port)
    finally:
        service.close()
