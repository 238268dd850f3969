"""Where a ClientApp message's time goes (benchmarks/bench_deploy_overhead.py). Off unless $FEDRAG_TIMING_LOG names
a file: then each message appends one JSON line of marks (process created, module imported, handler entered, then
the handler's own phases) and each process one line when it exits, which in deployment is after Flower pushed its
reply (flwr-clientapp runs one message per process). A mark is [wall clock, this process's CPU seconds]: wall clock
so that the lines of several processes and the message's creation on the server compare, CPU seconds because on a
shared machine they say what a phase costs regardless of who else ran meanwhile. The benchmark makes durations."""

from __future__ import annotations

import atexit
import json
import os
import time

from fedrag_app.core.environment import timing_log


def stamp() -> list[float]:
    """[wall clock, CPU seconds this process has used]."""
    return [time.time(), time.process_time()]


def process_started_at() -> float | None:
    """When this process was created (wall clock, 10 ms resolution, from /proc); None where there is no /proc."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:  # one short line per write: appends from several processes do not interleave
        f.write(json.dumps(row) + "\n")


_EXIT_HOOKED: set[int] = set()  # processes whose exit line is registered (a forked child registers its own)


def _exited(path: str, pid: int) -> None:
    if os.getpid() == pid:
        _append(path, {"pid": pid, "exit": stamp()})


def _server_round(msg) -> int | None:
    """The round of a train or evaluate message (its ConfigRecord "config"); None for a query."""
    if not msg.has_content() or "config" not in msg.content:
        return None
    config = msg.content["config"]
    return int(config["server-round"]) if "server-round" in config else None


class MessageClock:
    """``clock = MessageClock(msg, context, imported)`` (``imported``: the stamp() taken when the ClientApp module had
    been imported); ``clock.mark("loaded")`` after each phase; ``clock.done()`` at the end of the handler. A few
    floats per message when the log is off."""

    def __init__(self, msg, context, imported: list[float]):
        self.path = timing_log()
        self.marks = {"handler": stamp()}
        self.row = {
            "pid": os.getpid(),
            "run-id": int(context.run_id),
            "node-id": int(context.node_id),
            "partition-id": context.node_config.get("partition-id"),
            "type": msg.metadata.message_type,
            "group": msg.metadata.group_id,
            "created": float(msg.metadata.created_at),
            "round": _server_round(msg),
            "imported": imported,
        }

    def mark(self, phase: str) -> None:
        self.marks[phase] = stamp()

    def done(self) -> None:
        self.mark("end")
        if not self.path:
            return
        _append(self.path, {**self.row, "process": [process_started_at(), 0.0], **self.marks})
        if os.getpid() not in _EXIT_HOOKED:
            _EXIT_HOOKED.add(os.getpid())
            atexit.register(_exited, self.path, os.getpid())
