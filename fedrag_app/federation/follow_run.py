"""Launch a run with `flwr run <app> <connection>` and follow it to its final status with `flwr ls --format json`.

The one home of run-following: `fedrag-app ask --federation`, the quickstart, deploy/fedrag_deploy.py,
experiments/run_table.py, the benchmarks and the tests all import it from here. It drives Flower's own CLI in
subprocesses and imports no `flwr` module, so it sits in federation/ beside ask.py, its first user.

`flwr run` returns as soon as the SuperLink has accepted the run (it exits 0 even when the run later fails), so its
exit code says only that the run was submitted; the verdict is the status the SuperLink reports: ``finished:completed``
is success, and ``finished:failed`` / ``finished:stopped`` are failures.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

COMPLETED = "finished:completed"


class RunFailed(RuntimeError):
    pass


def launch_run(
    app_dir: str,
    connection: str,
    run_config: list[str],
    *,
    flwr: str = "flwr",
    timeout_s: float = 300,
    env: dict | None = None,
    federation_config: str = "",
) -> int:
    """Submit the app; returns the run id. `run_config` items are `key=value` overrides (values as TOML);
    `federation_config` is passed as --federation-config (simulation: e.g. "num-supernodes=3")."""
    argv = [flwr, "run", app_dir, connection, "--format", "json"]
    if federation_config:
        argv += ["--federation-config", federation_config]
    if run_config:
        # One --run-config string: flwr 1.42 merges repeated ones with dict.update on the *nested* keys, so
        # `-c fed.a=1 -c fed.b=2` silently drops fed.a (flwr.common.config.parse_config_args).
        argv += ["--run-config", " ".join(run_config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=_cli_env(env))
    reply = _last_json(done.stdout)
    if done.returncode != 0 or not reply.get("success") or "run-id" not in reply:
        raise RunFailed(
            f"`{' '.join(argv)}` did not submit a run (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return int(reply["run-id"])


def run_status(connection: str, run_id: int, *, flwr: str = "flwr", env: dict | None = None) -> str:
    """The run's status as the SuperLink reports it, e.g. 'running' or 'finished:completed'."""
    argv = [flwr, "ls", connection, "--run-id", str(run_id), "--format", "json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=_cli_env(env))
    reply = _last_json(done.stdout)
    runs = reply.get("runs") or []
    if done.returncode != 0 or not reply.get("success") or not runs:
        raise RunFailed(f"`{' '.join(argv)}` failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return str(runs[0]["status"])


def stop_run(connection: str, run_id: int, *, flwr: str = "flwr", env: dict | None = None) -> None:
    """Stop a run; a run that finished meanwhile (the SuperLink marks an orphaned run failed on restart,
    racing the operator's stop) counts as stopped, any other refusal raises."""
    argv = [flwr, "stop", str(run_id), connection, "--format", "json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=_cli_env(env))
    reply = _last_json(done.stdout)
    if reply.get("success") or "already finished" in str(reply.get("error-message", "")):
        return
    raise RunFailed(f"`{' '.join(argv)}` failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def wait_for_run(
    connection: str,
    run_id: int,
    *,
    timeout_s: float,
    poll_s: float = 3.0,
    flwr: str = "flwr",
    on_status=None,
    env: dict | None = None,
    soon=None,
    follow_log: bool = False,
) -> str:
    """Poll until the run finishes or `timeout_s` passes; returns the final status (raises on a timeout).

    Each `flwr ls` costs ~1.8 s of CPU, so the status is read every `poll_s`; ``soon``, a cheap check (e.g. the last
    metrics row is on disk), says the run is about to finish: from then on it is read every second. With
    ``follow_log`` it first waits on the run's log stream instead (``wait_for_log_end``): no polling at all while the
    run goes on, and the status is then read once."""
    deadline = time.monotonic() + timeout_s
    if follow_log:
        wait_for_log_end(connection, run_id, timeout_s=timeout_s, flwr=flwr, env=env)
    last = ""
    while True:  # the status is read at least once, also after a log stream that used up the time
        try:
            status = run_status(connection, run_id, flwr=flwr, env=env)
        except (RunFailed, subprocess.TimeoutExpired) as e:  # the SuperLink may be restarting; keep polling
            status = f"unreachable ({str(e).splitlines()[0]})"
        if status != last and on_status:
            on_status(status)
        last = status
        if status.startswith("finished"):
            return status
        if time.monotonic() >= deadline:
            break
        waited = 0.0
        while waited < poll_s and not (soon is not None and soon()):
            time.sleep(0.25)
            waited += 0.25
        if waited < poll_s:
            time.sleep(1.0)
    raise RunFailed(f"run {run_id} still '{last}' after {timeout_s:.0f} s")


def wait_for_log_end(
    connection: str, run_id: int, *, timeout_s: float, flwr: str = "flwr", env: dict | None = None
) -> bool:
    """Block on `flwr log RUN_ID CONNECTION --stream` until the SuperLink ends the stream, which flwr 1.42 does when
    the run has finished: one idle process for the whole run, where polling `flwr ls` starts a ~1.8 s-of-CPU process
    every few seconds. False if the stream broke first (a SuperLink restarting) or `timeout_s` passed; the caller
    reads the status either way. The log itself is not kept: read it with `flwr log --show` (lines the ServerApp
    wrote just before it finished may miss the stream)."""
    argv = [flwr, "log", str(run_id), connection, "--stream"]
    try:
        done = subprocess.run(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout_s, env=_cli_env(env)
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_flwr_env(flwr_home: str | os.PathLike, *, bin_dir: str | os.PathLike | None = None, base=None) -> dict:
    """The environment for `flwr run . local` on a local simulation SuperLink of its own: its own FLWR_HOME (which
    ``local_federation_pids`` and ``stop_local_superlink`` find it by), free ports unless ``base`` (default: this
    process's environment) names them, no runtime dependency install, no telemetry, unbuffered output, and
    ``bin_dir`` (default: this interpreter's) first on PATH so `flwr` and the simulation run from the same venv."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(bin_dir or Path(sys.executable).parent)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONUNBUFFERED="1",
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
    )
    for key in ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT"):
        env.setdefault(key, str(free_port()))
    return env


def local_federation_pids(flwr_home: str, command: bytes = b"") -> list[int]:
    """PIDs of every process that inherited FLWR_HOME=`flwr_home`: the local simulation SuperLink (`flwr run . local`
    starts it detached, in the background, and no flwr command stops it) and what it started (SuperExec,
    flwr-simulation, Ray); only those whose command line holds `command`, if given. This process and its ancestors
    are left out, in case the caller's own shell exported that FLWR_HOME."""
    marker, own = f"FLWR_HOME={flwr_home}".encode(), _self_and_ancestors()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            ours = marker in (entry / "environ").read_bytes().split(b"\0")
            if ours and (not command or command in (entry / "cmdline").read_bytes()):
                pids.append(int(entry.name))
        except OSError:  # not ours to read, or gone meanwhile
            continue
    return pids


def stop_local_superlink(flwr_home: str, timeout_s: float = 30) -> None:
    """Kill the local SuperLink and every process it started: killing the SuperLink alone orphans a running
    simulation (flwr-simulation and its Ray workers keep the cores busy)."""
    import signal

    deadline = time.monotonic() + timeout_s
    while (pids := local_federation_pids(flwr_home)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.5)


def _self_and_ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def _cli_env(base: dict | None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def _last_json(text: str) -> dict:
    """The CLI may print log lines before its JSON; read the JSON object that ends the output."""
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return {}


if __name__ == "__main__":  # pragma: no cover - python -m fedrag_app.federation.follow_run CONNECTION RUN_ID
    print(wait_for_run(sys.argv[1], int(sys.argv[2]), timeout_s=float(os.environ.get("TIMEOUT_S", 3600))))
