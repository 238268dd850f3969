"""Where a deployed round's time goes (issue 41): a SuperLink and 3 SuperNodes as local processes, with TLS and node
authentication (tests/deploy_helpers.py, driven through deploy/fedrag_deploy.py as the deployment tests do), the real
default models, a few RA-DIT rounds with the nodes' evaluation, then a federated query run.

    python benchmarks/bench_deploy_overhead.py                      # 4 rounds, 3 nodes, then 6 questions in 3 batches
    python benchmarks/bench_deploy_overhead.py --report WORKDIR     # the tables again, from a kept run

Every ClientApp logs its phases ($FEDRAG_TIMING_LOG, fedrag_app/flower/message_clock.py); flwr 1.42 runs each
message in a fresh `flwr-clientapp` process, so per message:
  dispatch     the message's creation on the ServerApp -> its process exists (ServerApp push, the SuperNode's pull,
               which sleeps 3 s when it finds nothing, the SuperExec's task poll, 1 s, the spawn)
  start        process -> handler: Python, flwr's imports, task pull, FAB install, the ClientApp module's imports
  imports      what the handler imports itself (lazily: only what its message type needs)
  model load   generator and/or retriever from disk (+ LoRA)        weights in   the global weights set, data read
  shard open   the Qdrant Edge shard (+ the context encoder's fingerprint checked against it)
  compute      the local round / the evaluation / the search         reply        pack, then Flower's push (to exit)
each as the median wall-clock and the median of the process's own CPU seconds (on a shared machine the CPU seconds
say what a phase costs; the wall clock, what it took). Per round: when the last node's process exited, when its
SuperNode had uploaded the last reply (the SuperNodes' log lines, timed as they appear), when the ServerApp held
them all (its training phase), against the nodes' compute. And the CPU seconds of each step of a ClientApp
process's imports, in a fresh interpreter. The figures of issue 41 are in docs/PERFORMANCE.md (Deployment).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDRAG_DATA_DIR", str(REPO.parent / "shared" / "data"))  # as tests/conftest.py
sys.path.insert(0, str(REPO))  # this checkout's fedrag_app and tests/
from fedrag_app.core import environment  # noqa: E402

# (name, mark that ends it); each phase runs from the previous mark present in the line
PHASES = [
    ("dispatch", "process"),
    ("start", "handler"),
    ("imports", "imports"),
    ("model load", "models"),
    ("weights in", "weights"),
    ("shard open", "shard"),
    ("compute", "compute"),
    ("pack", "end"),
    ("push", "exit"),
]
MARKS = ["created"] + [mark for _, mark in PHASES]
NAMES = ["node-0", "node-1", "node-2"]


class LogTimes(threading.Thread):
    """Flower's SuperNode logs carry no times: stamp each line of interest as it appears in a node's log (polled every
    0.2 s), so a reply's way out is timed too: handed to the SuperNode ("Sending: train message") and uploaded to the
    SuperLink ("Sent successfully")."""

    EVENT = re.compile(r"(Receiving|Sending): (\S+) message|(Sent|Received) successfully")

    def __init__(self, logs: dict[str, Path], out: Path):
        super().__init__(daemon=True)
        self.logs, self.out, self.stop = logs, out, threading.Event()

    def run(self) -> None:
        offsets = dict.fromkeys(self.logs, 0)
        with self.out.open("a") as out:
            while not self.stop.wait(0.2):
                for name, path in self.logs.items():
                    with path.open("rb") as f:
                        f.seek(offsets[name])
                        text = f.read().decode(errors="replace")
                    complete = text[: text.rfind("\n") + 1]
                    offsets[name] += len(complete.encode())
                    for line in complete.splitlines():
                        if m := self.EVENT.search(line):
                            event = (m.group(1) or m.group(3)).lower()
                            out.write(json.dumps({"node": name, "t": time.time(), "event": event, "type": m.group(2)}))
                            out.write("\n")
                out.flush()


def run(args) -> Path:
    from tests.deploy_helpers import Federation
    from tests.deploy_runs import TINY_RUN, build_template_shard, make_node_data, node_config

    work = Path(args.workdir or f"/tmp/fedrag_bench_deploy_{int(time.time())}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    shard = work / "template-shard"
    if not shard.exists():
        build_template_shard(shard, args.retriever)
    (work / "federation").mkdir(exist_ok=True)
    fed = Federation(work / "federation")
    fed.env[environment.TIMING_LOG] = str(work / "timings.jsonl")
    fed.env[environment.DATA_DIR] = environment.data_dir()
    common = {
        **TINY_RUN,  # the deployment tests' smallest step sizes: 1 step per phase, short sequences, 64 passages
        "generator.model": args.generator,
        "retriever.model": args.retriever,
        "train.mode": "ra-dit",
        "fed.min-nodes": len(NAMES),
    }
    started = {}
    try:
        fed.create_credentials()
        fed.start_superlink()
        for i, name in enumerate(NAMES):
            node_dir, node_shard = make_node_data(fed.work, name, i, shard)
            config = node_config(node_dir, partition_id=i, num_partitions=len(NAMES), shard=node_shard)
            fed.add_node(name, {**config, "federated-retrieval": True})
        fed.wait_online(NAMES)
        log_times = LogTimes({name: fed.logs[name] for name in NAMES}, work / "log_times.jsonl")
        log_times.start()
        print(f"load average before: {os.getloadavg()}", flush=True)
        train = {
            **common,
            "fed.num-server-rounds": args.rounds,
            "fed.fraction-evaluate": 1.0,
            "fed.output-dir": str(work / "train"),
        }
        query = {
            **common,
            "fed.task": "query",
            "query.questions-limit": args.questions,
            "query.batch-size": args.batch_size,
            "query.top-k-per-node": 5,
            "fed.output-dir": str(work / "query"),
        }
        for label, run_config in (("train", train), ("query", query)):
            t0 = time.time()
            run_id = fed.launch(run_config)
            status = fed.wait_run(run_id, timeout_s=args.timeout)
            started[label] = {"run-id": run_id, "status": status, "seconds": time.time() - t0}
            print(f"{label} run {run_id}: {status} in {time.time() - t0:.0f} s from submit", flush=True)
            if status != "finished:completed":
                print(fed.run_log(run_id)[-3000:])
        print(f"load average after: {os.getloadavg()}", flush=True)
    finally:
        if "log_times" in locals():
            log_times.stop.set()
        fed.close()
    (work / "runs.json").write_text(json.dumps(started, indent=2))
    return work


IMPORT_STEPS = [  # what a ClientApp process imports, in order: flwr-clientapp's own runtime, then ours
    ("Python + flwr-clientapp's runtime", "import flwr.supernode.runtime.run_clientapp"),
    ("the ClientApp module", "import fedrag_app.flower.client_app"),
    ("torch", "import torch"),
    ("transformers (AutoModelForCausalLM)", "from transformers import AutoModelForCausalLM"),
    ("sentence-transformers (with peft, bitsandbytes, datasets)", "import sentence_transformers"),
    (
        "the rest of train's and evaluate's imports",
        "import fedrag_app.training.local_round, fedrag_app.evaluation.evaluate",
    ),
]
IMPORT_SCRIPT = """
import json, sys, time
t, steps = 0.0, []  # process_time counts from the process's start: the first step includes the interpreter's
for name, statement in json.loads(sys.argv[1]):
    exec(statement)
    steps.append((name, time.process_time() - t))
    t = time.process_time()
print(json.dumps(steps))
"""


def import_costs() -> list[tuple[str, float]]:
    """CPU seconds of each step of a ClientApp process's imports, in a fresh interpreter (process_time from its start,
    so the first step includes the interpreter's own start-up)."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_SCRIPT, json.dumps(IMPORT_STEPS)], capture_output=True, text=True, cwd=REPO
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _wall_cpu(value) -> tuple[float | None, float | None]:
    """A mark: [wall clock, process CPU seconds] (a bare number: wall clock only, as the first runs logged)."""
    if isinstance(value, list):
        return value[0], value[1]
    return value, None


def messages(path: Path) -> list[dict]:
    """One dict per message: its log line, plus "wall" and "cpu" ({phase: seconds}; no CPU for dispatch)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    exits = {r["pid"]: r["exit"] for r in rows if "exit" in r}
    out = []
    for r in rows:
        if "handler" not in r:
            continue
        r = {**r, "exit": exits.get(r["pid"])}
        r["wall"], r["cpu"], last = {}, {}, (r["created"], None)
        for name, mark in PHASES:
            if r.get(mark) is None:
                continue
            now = _wall_cpu(r[mark])
            r["wall"][name] = now[0] - last[0]
            if now[1] is not None and last[1] is not None:
                r["cpu"][name] = now[1] - last[1]
            last = now
        out.append(r)
    return out


def summary(ms: list[dict], kind: str) -> dict[str, float]:
    """Median seconds ("wall" or "cpu") of each phase, the grouped figures the issue asks for, and the overhead: the
    message's time in its process less compute and reply (start, imports, model load, weights in, shard open)."""
    med = {name: statistics.median(m[kind].get(name, 0.0) for m in ms) for name, _ in PHASES}
    med["start+imports"] = med["start"] + med["imports"]
    med["reply"] = med["pack"] + med["push"]
    med["overhead"] = sum(med[n] for n in ("start", "imports", "model load", "weights in", "shard open"))
    return med


def _rounds(train: list[dict]) -> dict[int, list[dict]]:
    """Train messages by server round: their "round" field, or (lines logged without one) by when the ServerApp
    created them: a round's messages are created together, rounds apart by at least a node's local round."""
    if all(m.get("round") is not None for m in train):
        out = defaultdict(list)
        for m in train:
            out[m["round"]].append(m)
        return dict(out)
    out, last = defaultdict(list), None
    for m in sorted(train, key=lambda m: m["created"]):
        if last is None or m["created"] - last > 5:
            n = len(out) + 1
        out[n].append(m)
        last = m["created"]
    return dict(out)


def _uploads(work: Path, train: list[dict]) -> dict[int, float]:
    """id(train message) -> when its SuperNode logged "Sent successfully" for it (LogTimes): a node's k-th train
    reply sent is its k-th train message; node-i is partition i."""
    path = work / "log_times.jsonl"
    if not path.exists():
        return {}
    events = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out = {}
    for i, name in enumerate(NAMES):
        sent, sending = [], None
        for e in (e for e in events if e["node"] == name):
            if e["event"] == "sending":
                sending = e["type"]
            elif e["event"] == "sent" and sending is not None:
                sent.append((sending, e["t"]))
                sending = None
        mine = sorted((m for m in train if m["partition-id"] == i), key=lambda m: m["created"])
        for m, t in zip(mine, [t for kind, t in sent if kind == "train"]):
            out[id(m)] = t
    return out


def report(work: Path) -> None:
    runs = json.loads((work / "runs.json").read_text())
    ms = messages(work / "timings.jsonl")
    by_run = {label: [m for m in ms if m["run-id"] == info["run-id"]] for label, info in runs.items()}
    print("\nimports of a ClientApp process, CPU seconds in a fresh interpreter (a query message needs the first two):")
    for name, cpu in import_costs():
        print(f"  {name:<60} {cpu:5.2f}")
    cols = ["dispatch", "start+imports", "model load", "weights in", "shard open", "compute", "reply", "overhead"]
    for kind, what in (("wall", "wall-clock"), ("cpu", "CPU (the process's own)")):
        print(f"\nper message, median {what} seconds; overhead = start+imports, model load, weights in, shard open")
        print("| message | n | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 2) + "|")
        for run_ms in by_run.values():
            kinds = defaultdict(list)
            for m in run_ms:
                kinds[m["type"]].append(m)
            for mtype, kms in sorted(kinds.items()):
                if kind == "cpu" and not any(m["cpu"] for m in kms):
                    continue  # logged before the marks carried CPU seconds
                s = summary(kms, kind)
                cells = ["–" if kind == "cpu" and c == "dispatch" else f"{s[c]:.2f}" for c in cols]
                print(f"| {mtype} | {len(kms)} | " + " | ".join(cells) + " |")
    print("\n'start' up to the ClientApp module imported (Python, flwr, task pull, FAB install, the module's imports):")
    for run_ms in by_run.values():
        for mtype in sorted({m["type"] for m in run_ms}):
            kms = [m for m in run_ms if m["type"] == mtype]
            wall = statistics.median(_wall_cpu(m["imported"])[0] - _wall_cpu(m["process"])[0] for m in kms)
            cpus = [_wall_cpu(m["imported"])[1] for m in kms]
            cpu = f", {statistics.median(cpus):.2f} s CPU" if None not in cpus else ""
            print(f"  {mtype}: {wall:.2f} s wall{cpu} (median)")
    train = by_run.get("train", [])
    rounds = _rounds([m for m in train if m["type"] == "train"])
    rows = []
    if (work / "train" / "metrics.jsonl").exists():
        rows = [json.loads(x) for x in (work / "train" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if rows:
        uploads = _uploads(work, [m for m in train if m["type"] == "train"])
        print("\nper round, seconds after the ServerApp created the round's train messages: when the last node's")
        print("process exited, when its SuperNode had uploaded the last reply, when the ServerApp held them all")
        print(
            "| round | last process exit | last reply uploaded | replies in hand (training phase) "
            "| compute, longest node | compute, sum of nodes | share not compute |"
        )
        print("|---|---|---|---|---|---|---|")
        total_wall = total_max = 0.0
        for row in rows:
            tms = rounds.get(row["round"], [])
            comp = [m["wall"].get("compute", 0.0) for m in tms]
            t0 = min(m["created"] for m in tms)
            ends = [_wall_cpu(m["exit"])[0] for m in tms if m.get("exit")]
            sent = [uploads[id(m)] for m in tms if id(m) in uploads]
            exit_at = f"{max(ends) - t0:.1f} s" if ends else "–"
            sent_at = f"{max(sent) - t0:.1f} s" if len(sent) == len(tms) else "–"
            wall = row["round-train-seconds"]
            total_wall, total_max = total_wall + wall, total_max + max(comp, default=0.0)
            print(
                f"| {row['round']} | {exit_at} | {sent_at} | {wall:.1f} s | {max(comp, default=0):.1f} s "
                f"| {sum(comp):.1f} s | {1 - max(comp, default=0) / wall:.0%} |"
            )
        evals = [m for m in train if m["type"] == "evaluate"]
        print(
            f"\ntrain run: {runs['train']['seconds']:.0f} s from submit to finished; training phases "
            f"{total_wall:.0f} s against {total_max:.0f} s of compute on the longest node each round"
            + (f"; {len(evals)} evaluate messages" if evals else "")
        )
    if (work / "query" / "query-metrics.json").exists():
        q = json.loads((work / "query" / "query-metrics.json").read_text())
        keep = {k: round(v, 3) for k, v in q.items() if k.startswith(("s-per-question", "replies-")) or k == "seconds"}
        print(f"query run: {runs['query']['seconds']:.0f} s from submit; query-metrics {json.dumps(keep)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--questions", type=int, default=6, help="questions of the query run")
    ap.add_argument("--batch-size", type=int, default=2, help="questions per query.retrieve message")
    ap.add_argument("--generator", default="smollm2-135m-instruct")
    ap.add_argument("--retriever", default="all-minilm-l6-v2")
    ap.add_argument("--workdir", default="", help="default: a new /tmp/fedrag_bench_deploy_<time>")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--report", default="", help="only print the tables of a kept WORKDIR")
    args = ap.parse_args()
    work = Path(args.report) if args.report else run(args)
    print(f"work folder: {work}")
    report(work)


if __name__ == "__main__":
    main()
