"""One malicious institution of five (issue 37): the global model's held-out loss after three rounds, for each
aggregation option and attack. The table in docs/ROBUSTNESS.md is this script's printout.

    python benchmarks/bench_robustness.py            # ~3 minutes on 2 cores

The federation is tests/malicious_federation.py's (tests/test_malicious_institution.py asserts a subset): the
server's real strategy drives real ClientApp rounds of RALT on the tiny models; node 5 trains honestly, then sends
the global weights plus its update x1000 (scaled), x-1 (sign-flipped) or x-1000 (both).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPTIONS = {
    "FedAvg": {},
    "fedmedian": {"fed.strategy": "fedmedian"},
    "fedtrimmedavg (beta 0.2)": {"fed.strategy": "fedtrimmedavg"},
    "krum (f = 1)": {"fed.strategy": "krum"},
    "multikrum (f = 1, 4 averaged)": {"fed.strategy": "multikrum"},
    "FedAvg + update-norm-bound 2": {"fed.update-norm-bound": 2.0},
    "FedAvg + update-norm-bound 3": {"fed.update-norm-bound": 3.0},
    "fedmedian + update-norm-bound 2": {"fed.strategy": "fedmedian", "fed.update-norm-bound": 2.0},
}
ATTACKS = {"honest": None, "x1000": 1000.0, "sign-flipped": -1.0, "x-1000": -1000.0}


def main() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from tests.deploy_runs import build_template_shard
    from tests.malicious_federation import ROUNDS, federation
    from tests.tiny_models import tiny_models

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1  # Messages as in a ServerApp
    generator, retriever = tiny_models()
    with tempfile.TemporaryDirectory() as tmp:
        shard = build_template_shard(Path(tmp) / "template", retriever)
        fed = federation(Path(tmp), shard, {"generator.model": generator, "retriever.model": retriever})
        started = time.perf_counter()
        losses = {(o, a): fed.train(OPTIONS[o], ATTACKS[a]) for o in OPTIONS for a in ATTACKS}
        seconds = time.perf_counter() - started
    honest = losses[("FedAvg", "honest")]
    print(
        f"held-out loss after {ROUNDS} rounds (untrained: {fed.heldout_loss(fed.initial):.3f}); "
        f"in brackets: / all-honest FedAvg ({honest:.3f})\n"
    )
    print("| option | " + " | ".join(ATTACKS) + " |")
    print("|---" * (len(ATTACKS) + 1) + "|")
    for o in OPTIONS:
        print(f"| {o} | " + " | ".join(f"{losses[(o, a)]:.3f} ({losses[(o, a)] / honest:.2f})" for a in ATTACKS) + " |")
    print(f"\n{len(losses)} federations of 5 nodes x {ROUNDS} rounds in {seconds:.0f} s")


if __name__ == "__main__":
    main()
