"""Federation benchmark (issue 4): bytes per client per round, and what Flower adds to a round in simulation.

    python benchmarks/bench_federation.py                       # 3 clients, 2 RA-DIT rounds, small sizes
    python benchmarks/bench_federation.py --bytes-only

1. Bytes per message for each exchange option, from the real records a node sends (outgoing_state and, for fp16,
   to_wire_update on the real models): LoRA only (train.mode=ralt), LoRA + the full query encoder (ra-dit, the
   default), and cheaper retriever options (top transformer layers only, fp16 on the wire).
2. A real `flwr run` simulation (`fedrag-app partition`, then the app), own FLWR_HOME and ports. Per round, from
   metrics.jsonl: the training phase's wall time (send -> last reply aggregated) against the time the clients
   spent in the train handler (model load on a fresh actor, unpack, local RALT/LSR, pack). Flower's simulation
   runs one ClientApp at a time on 2 cores (2 CPUs per client by default), so Flower's overhead is
   1 - sum(handler seconds) / round seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's fedrag_app
from fedrag_app.federation import follow_run  # noqa: E402

OPTIONS = {  # name -> run-config overrides
    "LoRA only (train.mode=ralt)": {"train.mode": "ralt"},
    "LoRA B factors only (train.mode=ralt, FFA-LoRA)": {"train.mode": "ralt", "fed.lora-aggregation": "ffa"},
    "LoRA + full query encoder (ra-dit default)": {},
    "LoRA + query encoder fp16 on the wire": {"retriever.wire-dtype": "float16"},
    "LoRA + top 2 query-encoder layers": {"retriever.train-top-layers": 2},
    "LoRA + top 1 query-encoder layer": {"retriever.train-top-layers": 1},
}


def bytes_table() -> list[tuple[str, int]]:
    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.federation.exchange import outgoing_state, to_wire_update
    from fedrag_app.flower.records import numpy_to_record
    from fedrag_app.rag.generator import load_generator
    from fedrag_app.rag.retriever import load_retriever

    gen = None
    rows = []
    for name, overrides in OPTIONS.items():
        cfg = AppConfig.from_flat(overrides)
        gen = gen or load_generator(cfg.generator)
        retriever = load_retriever(cfg.retriever)
        sent = outgoing_state(cfg, gen, retriever)  # a reply: the retriever update in the wire dtype
        record = numpy_to_record(to_wire_update(sent, sent, cfg.retriever.wire_dtype))
        rows.append((name, record.count_bytes()))
    return rows


def simulate(args) -> list[dict]:
    bin_dir = Path(sys.executable).parent
    work = Path(args.workdir).resolve()
    parts, out = work / "parts", work / f"outputs-{int(time.time())}"
    env = follow_run.local_flwr_env(work / "flwr_home", bin_dir=bin_dir)
    if not (parts / "manifest.json").exists():
        subprocess.run(
            [
                str(bin_dir / "fedrag-app"),
                "partition",
                "-n",
                str(args.clients),
                "--out",
                str(parts),
                "--set",
                f"partition.questions-per-client={args.questions}",
                "--set",
                f"partition.passages-per-client={args.passages}",
            ],
            check=True,
            env=env,
        )
    run_config = [
        f"partition.dir='{parts}'",
        f"fed.output-dir='{out}'",
        f"fed.num-server-rounds={args.rounds}",
        f"fed.min-nodes={args.clients}",
        "fed.server-eval=false",
        "fed.fraction-evaluate=0.0",
        "runtime.num-threads=2",
        "train.mode='ra-dit'",
        *args.set,
    ]
    started = time.perf_counter()
    try:
        run_id = follow_run.launch_run(
            str(REPO),
            "local",
            run_config,
            flwr=str(bin_dir / "flwr"),
            env=env,
            timeout_s=300,
            federation_config=f"num-supernodes={args.clients}",
        )
        status = follow_run.wait_for_run(
            "local",
            run_id,
            timeout_s=args.timeout,
            flwr=str(bin_dir / "flwr"),
            env=env,
            on_status=lambda s: print(f"  run {run_id}: {s}", flush=True),
        )
    finally:
        follow_run.stop_local_superlink(env["FLWR_HOME"])
    print(
        f"  status {status}, {time.perf_counter() - started:.0f} s from submit to finish (incl. start-up, model loads)"
    )
    return (
        [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if status == follow_run.COMPLETED
        else []
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--questions", type=int, default=16, help="training questions per client")
    ap.add_argument("--passages", type=int, default=300, help="passages in each client's shard")
    ap.add_argument("--workdir", default="/tmp/fedrag_bench_federation")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--set", action="append", default=[], help="extra run-config override, key=value (TOML value)")
    ap.add_argument("--bytes-only", action="store_true")
    args = ap.parse_args()

    print("== bytes per client per round, each direction (one ArrayRecord, as sent)")
    for name, size in bytes_table():
        print(f"  {name:<45} {size / 1e6:8.2f} MB")
    if args.bytes_only:
        return
    print(f"\n== simulation: {args.clients} clients, {args.rounds} RA-DIT rounds, {args.questions} questions each")
    for row in simulate(args):
        overhead = 1 - row["round-handler-seconds-sum"] / row["round-train-seconds"]
        print(
            f"  round {row['round']}: training phase {row['round-train-seconds']:.1f} s, clients in the handler "
            f"{row['round-handler-seconds-sum']:.1f} s (of which RALT/LSR {row['round-local-seconds-sum']:.1f} s) -> "
            f"Flower overhead {overhead:.1%}; {row['round-bytes-down'] / 1e6:.1f} MB down, "
            f"{row['round-bytes-up'] / 1e6:.1f} MB up"
        )


if __name__ == "__main__":
    main()
