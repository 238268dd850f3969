"""A real Flower federation on 127.0.0.1 for tests, driven only through deploy/fedrag_deploy.py.

`Federation` gives each test its own folder, FLWR_HOME (one per SuperNode too, as on separate machines), free
ports, CA, node keys and SuperLink database. Every process is started in its own session and stopped by its
process-group id in `close()` (tests call it in a `finally`), so ClientApp/ServerApp children die with it.
Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DEPLOY_CLI = DEPLOY / "fedrag_deploy.py"
VENV_BIN = Path(sys.executable).parent
CONNECTION = "fed"

sys.path.insert(0, str(DEPLOY))
from flower_commands import node_config_toml  # noqa: E402

from fedrag_app.config.values import toml_value  # noqa: E402
from fedrag_app.federation import follow_run  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, *, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Federation:
    def __init__(self, work: Path, *, app_dir: Path = REPO):
        self.work = Path(work)
        self.app_dir = Path(app_dir)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.flwr_home = self.work / "operator_flwr_home"
        self.certs = self.work / "certs"
        self.database = self.work / "superlink" / "state.db"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.node_ids: dict[str, int] = {}
        self.env = dict(os.environ)
        self.env.update(
            {
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )

    # --- operator -------------------------------------------------------------------------------------------
    def create_credentials(self) -> None:
        self.cli("tls", str(self.certs), "--host", "127.0.0.1")
        self.cli("connection", CONNECTION, self.address, str(self.certs / "ca.crt"))

    def start_superlink(self) -> None:
        offset = len(self.log("superlink"))  # the log is appended across restarts
        self._start(
            "superlink",
            [
                "superlink",
                "--tls-dir",
                str(self.certs),
                "--database",
                str(self.database),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=self.work,
            env=self.env,
        )
        wait_until(
            lambda: "Uvicorn running on https://" in self.log("superlink")[offset:] or self._died("superlink"),
            timeout_s=60,
            what="the SuperLink to listen",
        )
        assert not self._died("superlink"), f"SuperLink exited:\n{self.log('superlink')}"

    def register(self, name: str) -> int:
        out = self.cli("register", str(self.work / "keys" / f"{name}.pub"), CONNECTION, "--name", name)
        self.node_ids[name] = int(follow_run._last_json(out)["node-id"])
        return self.node_ids[name]

    def online_node_ids(self) -> set[int]:
        done = subprocess.run(
            [str(VENV_BIN / "flwr"), "supernode", "list", CONNECTION, "--format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
        )
        nodes = follow_run._last_json(done.stdout).get("nodes") or []
        return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}

    def wait_online(self, names: list[str], timeout_s: float = 90) -> None:
        want = {self.node_ids[n] for n in names}
        wait_until(
            lambda: want <= self.online_node_ids(), timeout_s=timeout_s, what=f"SuperNodes {names} online", poll_s=4
        )

    def launch(self, run_config: dict) -> int:
        items = [f"{k}={toml_value(v, k)}" for k, v in run_config.items()]
        return follow_run.launch_run(
            str(self.app_dir), CONNECTION, items, flwr=str(VENV_BIN / "flwr"), timeout_s=180, env=self.env
        )

    def wait_run(self, run_id: int, timeout_s: float) -> str:
        """On the run's log stream, not by polling `flwr ls`: each poll is a ~1.8 s-of-CPU process on the two cores
        the federation shares with the other test workers."""
        return follow_run.wait_for_run(
            CONNECTION, run_id, timeout_s=timeout_s, flwr=str(VENV_BIN / "flwr"), env=self.env, follow_log=True
        )

    def run_status(self, run_id: int) -> str:
        return follow_run.run_status(CONNECTION, run_id, flwr=str(VENV_BIN / "flwr"), env=self.env)

    def stop_run(self, run_id: int) -> None:
        follow_run.stop_run(CONNECTION, run_id, flwr=str(VENV_BIN / "flwr"), env=self.env)

    def run_log(self, run_id: int) -> str:
        """The ServerApp's log as the SuperLink stored it (`flwr log RUN_ID <conn> --show`)."""
        done = subprocess.run(
            [str(VENV_BIN / "flwr"), "log", str(run_id), CONNECTION, "--show"],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
        )
        return done.stdout + done.stderr

    # --- institution ----------------------------------------------------------------------------------------
    def add_node(self, name: str, node_config: dict, *, register: bool = True) -> None:
        """Key pair (+ registration), node.toml, and a SuperNode with its own FLWR_HOME and Runtime API port."""
        self.cli("node-key", str(self.work / "keys"), name)
        if register:
            self.register(name)
        node_toml = self.work / "nodes" / name / "node.toml"
        node_toml.parent.mkdir(parents=True, exist_ok=True)
        node_toml.write_text(node_config_toml(node_config))
        self.start_node(name)

    def start_node(self, name: str) -> None:
        env = dict(self.env, FLWR_HOME=str(self.work / "nodes" / name / "flwr_home"))
        self._start(
            name,
            [
                "supernode",
                "--superlink",
                self.address,
                "--ca-cert",
                str(self.certs / "ca.crt"),
                "--private-key",
                str(self.work / "keys" / name),
                "--node-config",
                str(self.work / "nodes" / name / "node.toml"),
                "--port",
                str(free_port()),
            ],
            cwd=self.work / "nodes" / name,
            env=env,
        )

    # --- processes ------------------------------------------------------------------------------------------
    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, str(DEPLOY_CLI), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
            cwd=self.work,
        )
        assert done.returncode == 0, f"fedrag_deploy.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def log(self, name: str) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def exited(self, name: str, timeout_s: float) -> int:
        return self.procs[name].wait(timeout=timeout_s)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process and its children (its own session), like a machine going away."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        _reap_group(proc.pid)

    def close(self) -> None:
        """SIGTERM every process group at once, give them 10 s together, then SIGKILL what is left: one slow
        process no longer holds up the others' shutdown (7 in a row used to take over a minute)."""
        live = [proc for proc in self.procs.values() if proc.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            _reap_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def _start(self, name: str, args: list[str], *, cwd: Path, env: dict) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.logs[name] = self.work / "logs" / f"{name}.log"
        self.logs[name].parent.mkdir(parents=True, exist_ok=True)
        with self.logs[name].open("a") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(DEPLOY_CLI), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )

    def _died(self, name: str) -> bool:
        return self.procs[name].poll() is not None


def _reap_group(pgid: int) -> None:
    """SIGKILL whatever is left in a process group we started (e.g. an orphaned flwr-clientapp)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
