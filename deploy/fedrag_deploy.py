#!/usr/bin/env python3
"""Deploy fedrag_app across machines: TLS, SuperNode keys, SuperLink, SuperNodes, runs. See deploy/README.md.

  operator:     fedrag_deploy.py tls certs/ --host superlink.example.org
                fedrag_deploy.py connection prod superlink.example.org:8000 certs/ca.crt
                fedrag_deploy.py register keys/hospital-a.pub prod
                fedrag_deploy.py superlink --tls-dir certs/ --database state/state.db --host 0.0.0.0
                fedrag_deploy.py run . prod -c fed.num-server-rounds=3 --timeout-s 7200
  institution:  fedrag_deploy.py node-key keys/ hospital-a       (send keys/hospital-a.pub to the operator)
                fedrag_deploy.py supernode --superlink superlink.example.org:8000 --ca-cert ca.crt \\
                    --private-key keys/hospital-a --node-config node.toml
  maintainers:  fedrag_deploy.py compose deploy/compose/          (regenerate the Docker Compose files)

Needs only what `pip install -e .` installs (flwr, cryptography). `superlink`/`supernode` exec the Flower binary
(so a process manager sees Flower's own PID and exit code); `--print` shows the command instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's fedrag_app

import compose_files  # noqa: E402
import credentials  # noqa: E402
from flower_commands import (  # noqa: E402
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    SuperLinkSettings,
    SuperNodeSettings,
    connection_toml,
    superlink_argv,
    supernode_argv,
)

from fedrag_app.federation import follow_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def cmd_tls(args) -> int:
    hosts = list(dict.fromkeys(args.host + ["127.0.0.1", "localhost"]))  # the SuperLink's own ServerApp dials loopback
    for name, path in credentials.make_tls(args.out_dir, hosts).items():
        print(f"{name:11s} {path}")
    print(f"give institutions {Path(args.out_dir) / 'ca.crt'} only; keep the .key files on the SuperLink host")
    return 0


def cmd_node_key(args) -> int:
    private, public = credentials.make_node_key(args.out_dir, args.name)
    print(f"private key (stays here): {private}\npublic key (send to the operator): {public}")
    return 0


def cmd_connection(args) -> int:
    """Add `[superlink.<name>]` to $FLWR_HOME/config.toml so `flwr run . <name>` dials the SuperLink over TLS."""
    flwr_home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    config = flwr_home / "config.toml"
    text = config.read_text() if config.exists() else f'[superlink]\ndefault = "{args.name}"\n'
    if f"[superlink.{args.name}]" in text:
        print(f"{config} already has [superlink.{args.name}]; edit it by hand to change it", file=sys.stderr)
        return 1
    flwr_home.mkdir(parents=True, exist_ok=True)
    ca_cert = Path(args.ca_cert).resolve()
    config.write_text(text.rstrip("\n") + "\n\n" + connection_toml(args.name, args.address, str(ca_cert)))
    print(f"added connection '{args.name}' ({args.address}, CA {ca_cert}) to {config}")
    return 0


def cmd_register(args) -> int:
    argv = [args.flwr, "supernode", "register", args.public_key, args.connection, "--format", "json"]
    if args.name:
        argv += ["--name", args.name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    reply = follow_run._last_json(done.stdout)
    if done.returncode != 0 or not reply.get("success"):
        print(f"registration failed (exit {done.returncode}):\n{done.stdout}{done.stderr}", file=sys.stderr)
        return 1
    print(json.dumps({"public-key": args.public_key, "node-id": reply["node-id"]}))
    return 0


def cmd_superlink(args) -> int:
    settings = SuperLinkSettings(
        tls_dir=str(Path(args.tls_dir).resolve()),
        database=str(Path(args.database).resolve()),
        host=args.host,
        port=args.port,
        log_file=args.log_file,
    )
    Path(settings.database).parent.mkdir(parents=True, exist_ok=True)
    return _exec(superlink_argv(settings), args.print)


def cmd_supernode(args) -> int:
    node_config = str(Path(args.node_config).resolve()) if args.node_config else ""
    settings = SuperNodeSettings(
        superlink=args.superlink,
        ca_cert=str(Path(args.ca_cert).resolve()),
        private_key=str(Path(args.private_key).resolve()),
        node_config_file=node_config,
        host=args.host,
        port=args.port,
    )
    return _exec(supernode_argv(settings), args.print)


def cmd_run(args) -> int:
    try:
        run_id = follow_run.launch_run(args.app, args.connection, args.run_config, flwr=args.flwr)
        print(
            f"run {run_id} submitted; following its status (flwr log {run_id} {args.connection} --stream for logs)",
            flush=True,
        )
        status = follow_run.wait_for_run(
            args.connection,
            run_id,
            timeout_s=args.timeout_s,
            flwr=args.flwr,
            on_status=lambda s: print(f"run {run_id}: {s}", flush=True),
        )
    except follow_run.RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"run-id": run_id, "status": status}))
    return 0 if status == follow_run.COMPLETED else 1


def cmd_compose(args) -> int:
    for path in compose_files.write_all(args.out_dir):
        print(path)
    return 0


def _exec(argv: list[str], print_only: bool) -> int:
    if print_only:
        print(shlex.join(argv))
        return 0
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.execvp(argv[0], argv)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    c = sub.add_parser("tls", help="create the federation CA and the SuperLink certificate")
    c.add_argument("out_dir")
    c.add_argument(
        "--host", action="append", default=[], help="name or IP SuperNodes dial (repeat); loopback is always added"
    )
    c.set_defaults(func=cmd_tls)

    c = sub.add_parser("node-key", help="create a SuperNode key pair (run by the institution)")
    c.add_argument("out_dir")
    c.add_argument("name", help="e.g. the institution's short name")
    c.set_defaults(func=cmd_node_key)

    c = sub.add_parser("connection", help="add a TLS connection to $FLWR_HOME/config.toml for the flwr CLI")
    c.add_argument("name")
    c.add_argument("address", help="host:port of the SuperLink")
    c.add_argument("ca_cert")
    c.set_defaults(func=cmd_connection)

    c = sub.add_parser("register", help="register a SuperNode public key with the SuperLink (operator)")
    c.add_argument("public_key")
    c.add_argument("connection")
    c.add_argument("--name", default="")
    c.add_argument("--flwr", default="flwr", help="flwr CLI executable")
    c.set_defaults(func=cmd_register)

    c = sub.add_parser("superlink", help="start the SuperLink: TLS, node auth, persistent state")
    c.add_argument("--tls-dir", required=True)
    c.add_argument("--database", required=True, help="sqlite file; keep it to survive restarts")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT)
    c.add_argument("--log-file", default="")
    c.add_argument("--print", action="store_true", help="print the command instead of running it")
    c.set_defaults(func=cmd_superlink)

    c = sub.add_parser("supernode", help="start an institution's SuperNode")
    c.add_argument("--superlink", required=True, help="host:port")
    c.add_argument("--ca-cert", required=True)
    c.add_argument("--private-key", required=True)
    c.add_argument("--node-config", default="", help="node.toml (see docs/FEDERATION.md for the keys)")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument(
        "--port", type=int, default=DEFAULT_SUPERNODE_PORT, help="local Runtime API port, one per node on a host"
    )
    c.add_argument("--print", action="store_true", help="print the command instead of running it")
    c.set_defaults(func=cmd_supernode)

    c = sub.add_parser("run", help="flwr run APP CONNECTION, then follow the run status until it finishes")
    c.add_argument("app")
    c.add_argument("connection")
    c.add_argument("-c", "--run-config", action="append", default=[], help="key=value override (repeat)")
    c.add_argument("--timeout-s", type=float, default=24 * 3600)
    c.add_argument("--flwr", default="flwr", help="flwr CLI executable")
    c.set_defaults(func=cmd_run)

    c = sub.add_parser("compose", help="regenerate the Docker Compose files from flower_commands.py")
    c.add_argument("out_dir")
    c.set_defaults(func=cmd_compose)
    return p


if __name__ == "__main__":
    sys.exit(main())
