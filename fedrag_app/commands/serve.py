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


def serve_mcp(
    cfg: AppConfig, *, retriever_path: str | None, name: str, transport: str, host: str, port: int, console
) -> None:
    if transport not in TRANSPORTS:
        raise ConfigError(f"--transport {transport!r}: use one of {', '.join(TRANSPORTS)}")
    from fedrag_app.bridges.mcp_server import build_mcp_server

    service = load_service(cfg, retriever_path=retriever_path, name=name, status=console)
    server = build_mcp_server(service, name)
    try:
        if transport == "stdio":
            print(f"MCP server {name!r} on stdio (tools: search, ask)", file=sys.stderr, flush=True)
            server.run("stdio")
        else:
            console.print(f"[green]MCP server[/] {name!r} at http://{host}:{port}/mcp (streamable HTTP)")
            server.run("streamable-http", host=host, port=port)
    finally:
        service.close()
