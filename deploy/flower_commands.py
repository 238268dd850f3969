"""The one place that turns deployment settings into flower-superlink / flower-supernode arguments.

The start commands (``fedrag_deploy.py superlink|supernode``) exec these argument lists, and the Docker Compose
files are rendered from the same functions with container paths (``compose_files.py``), so a flag changed here
changes both. Flags checked against ``flower-superlink --help`` / ``flower-supernode --help`` of flwr 1.42:
one HTTP port for the Fleet, Control and Runtime APIs (``--host/--port``; the gRPC-era 9091-9093 are gone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedrag_app.config.values import toml_lines

DEFAULT_SUPERLINK_PORT = 8000
DEFAULT_SUPERNODE_PORT = 9094  # the SuperNode's own Runtime API (ClientApp processes); one per node on a host


@dataclass(frozen=True)
class SuperLinkSettings:
    """A SuperLink with TLS, SuperNode authentication and a persistent state database (never in memory)."""

    tls_dir: str  # holds ca.crt, server.pem, server.key (credentials.make_tls)
    database: str  # sqlite file: runs, registered node keys and messages survive a restart
    host: str = "127.0.0.1"  # 0.0.0.0 to accept SuperNodes from other machines
    port: int = DEFAULT_SUPERLINK_PORT
    log_file: str = ""


@dataclass(frozen=True)
class SuperNodeSettings:
    """One institution's SuperNode: where the SuperLink is, its CA, its private key and its node config."""

    superlink: str  # host:port of the SuperLink, as named in its certificate
    ca_cert: str  # the federation CA certificate (ca.crt)
    private_key: str  # this node's OpenSSH EC private key; its .pub is registered on the SuperLink
    node_config_file: str = ""  # the institution's node.toml (flat keys: data paths, shard or Qdrant URL, opt-ins)
    host: str = "127.0.0.1"  # the SuperNode's local Runtime API; keep it on loopback
    port: int = DEFAULT_SUPERNODE_PORT


def superlink_argv(s: SuperLinkSettings) -> list[str]:
    tls = Path(s.tls_dir)
    argv = [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(tls / "ca.crt"),
        "--ssl-certfile",
        str(tls / "server.pem"),
        "--ssl-keyfile",
        str(tls / "server.key"),
        "--enable-supernode-auth",
        "--database",
        s.database,
        "--host",
        s.host,
        "--port",
        str(s.port),
        # The app's dependencies are installed beforehand (pip install -e .); a per-run `uv sync` would re-resolve
        # torch and fail offline.
        "--disable-runtime-dependency-installation",
    ]
    if s.log_file:
        argv += ["--log-file", s.log_file]
    return argv


def supernode_argv(s: SuperNodeSettings) -> list[str]:
    argv = [
        "flower-supernode",
        "--root-certificates",
        s.ca_cert,
        "--superlink",
        s.superlink,
        "--auth-supernode-private-key",
        s.private_key,
        "--host",
        s.host,
        "--port",
        str(s.port),
    ]
    if s.node_config_file:
        # Flower reads a lone `*.toml` argument as a file (flwr.common.config.parse_config_args).
        argv += ["--node-config", s.node_config_file]
    return argv


def node_config_toml(node_config: dict) -> str:
    """{'data-path': '/d', 'partition-id': 0} -> the text of a node.toml Flower reads with --node-config."""
    return toml_lines(node_config)


def connection_toml(name: str, address: str, ca_cert: str) -> str:
    """A `[superlink.<name>]` table for $FLWR_HOME/config.toml: the CLI dials the SuperLink over TLS."""
    return f"[superlink.{name}]\n" + toml_lines({"address": address, "root-certificates": str(ca_cert)})
