"""`fedrag-app quickstart` (what `make run` runs): the product's main job, federated fine-tuning, on embedded
defaults sized for a 2-core CPU, from an empty cache to a fine-tuned answer in minutes.

1. index   the server's evaluation store (the first passages of the corpus, `fedrag-app index`) and three
           institutions' questions and Qdrant shards (`fedrag-app partition`); both are kept for the next run
2. train   `flwr run .` in Flower's simulation: RALT over 3 institutions with FedAvgM (server lr 1.7, momentum 0:
           the setting results/quality_full found to carry 82-87% of centralized's gain), a few rounds; the server
           evaluates the initial model (round 0) and the last round's on the same questions; its own FLWR_HOME and
           ports; progress is rounds done out of planned; the local SuperLink and the simulation are stopped
           afterwards, also on Ctrl-C
3. ask     the fine-tuned system (last round's checkpoint) answers one question
4. a summary: before (round 0) and after, each difference with its 95% paired-bootstrap interval over the same
   questions (evaluation/paired.py), where the checkpoints, metrics.jsonl and plot are, the next commands.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedrag_app.config.app_config import AppConfig
from fedrag_app.config.values import toml_value
from fedrag_app.core.atomic import write_json, write_text
from fedrag_app.core.environment import data_dir
from fedrag_app.core.errors import ConfigError, DataError, FedRagAppError
from fedrag_app.core.verbosity import child_env
from fedrag_app.data.loaders import LAYOUT, WHERE, missing_data
from fedrag_app.evaluation.reporting import read_metrics
from fedrag_app.federation import follow_run as fr

# The embedded defaults: every key is a run-config key (pyproject.toml documents them); --set overrides any.
DEFAULTS: dict[str, object] = {
    "partition.num-partitions": 3,
    "partition.scheme": "iid",
    "partition.questions-per-client": 100,
    "partition.passages-per-client": 150,
    "partition.heldout-fraction": 0.05,
    "store.passages-limit": 500,  # the server's evaluation store: the first 500 passages (the institutions' 450 too)
    "train.mode": "ralt",  # LSR gains nothing a paired test confirms yet (docs/LSR.md): not in the demo
    "train.num-examples": 48,  # each institution passes 1.5 times over its 95 questions in 3 rounds
    "ralt.batch-size": 4,
    "ralt.top-k": 1,
    "ralt.max-seq-len": 256,
    "ralt.learning-rate": 3e-4,
    "fed.strategy": "fedavgm",  # results/quality_full: server lr 1.7 with momentum 0 closes FedAvg's distance gap
    "fed.server-learning-rate": 1.7,
    "fed.server-momentum": 0.0,
    "fed.num-server-rounds": 3,
    "fed.min-nodes": 3,
    "fed.server-eval-round-0": True,  # the before, on the same questions as the after: a paired difference
    "eval.mmlu-limit": 20,
    "eval.web-questions-limit": 200,  # at 100 the interval was +-0.045 F1, at 200 +-0.038
    "eval.top-k": 1,
    "eval.batch-size": 10,
    "runtime.num-threads": 0,  # Flower's simulation runs one 2-CPU node at a time here; the server evaluates alone
}
QUESTION = "who was the 16th president of the united states"  # answered in the first 500 passages
SHOWN = (  # MMLU by the two protocols a favourite letter cannot pass for knowledge (evaluation/mmlu.py)
    "wq-f1",
    "wq-em",
    "retrieval-recall@10",
    "retrieval-mrr@10",
    "mmlu-circular-accuracy",
    "mmlu-cloze-accuracy",
)
# what the institutions' questions and shards depend on (their folder is named by a hash of these)
SHARD_KEYS = ("partition.", "data.", "runtime.seed", "retriever.model")
POLL_S, STATUS_EVERY_S = 2.0, 15.0  # metrics.jsonl is read every 2 s; `flwr ls` (~1.8 s of CPU) every 15 s


def app_dir() -> Path:
    """The Flower app folder `flwr run` packages: this checkout (the package is installed editable), else cwd."""
    for candidate in (Path(__file__).resolve().parents[2], Path.cwd()):
        pyproject = candidate / "pyproject.toml"
        if pyproject.exists() and "[tool.flwr.app]" in pyproject.read_text():
            return candidate
    raise ConfigError("quickstart runs `flwr run` on the app's folder: run it from a checkout of fedrag_app")


def run_config(overrides: dict[str, object], out: Path, data_dir: str | None) -> dict[str, object]:
    """DEFAULTS + overrides + the paths under ``out``; validated as an AppConfig (a bad key fails here, not in
    Flower)."""
    flat = {**DEFAULTS, **overrides}
    if flat["fed.strategy"] != DEFAULTS["fed.strategy"]:  # another strategy: FedAvgM's own settings do not apply
        for key in ("fed.server-learning-rate", "fed.server-momentum"):
            if key not in overrides:
                del flat[key]
    if "fed.server-eval-every" not in overrides:  # evaluate once, after the last round (the slow part on a CPU)
        flat["fed.server-eval-every"] = flat["fed.num-server-rounds"]
    if data_dir:
        flat["data.dir"] = str(Path(data_dir).resolve())
    flat["fed.min-nodes"] = flat["partition.num-partitions"]
    parts = {k: v for k, v in sorted(flat.items()) if k.startswith(SHARD_KEYS)}
    tag = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]
    # shards record their embedding model: another --set retriever.model gets its own server store
    model = flat.get("retriever.model")
    by = f"-{hashlib.sha256(str(model).encode()).hexdigest()[:8]}" if model else ""
    flat.update(
        {
            "partition.dir": str(out / f"partitions-{tag}"),
            "fed.output-dir": str(out / "fed"),
            "store.path": str(out / f"server-store-first{flat['store.passages-limit']}{by}"),
        }
    )
    AppConfig.from_flat(flat, source="quickstart")
    return flat


class Quickstart:
    def __init__(
        self,
        overrides: dict[str, object],
        *,
        out: Path,
        question: str = QUESTION,
        data_dir: str | None = None,
        console: Console | None = None,
    ):
        self.console = console or Console(soft_wrap=True)
        self.root, self.out, self.question = app_dir(), out.expanduser().resolve(), question
        self.flat = run_config(overrides, self.out, data_dir)
        self.cfg = AppConfig.from_flat(self.flat, source="quickstart")
        self.bin = Path(sys.executable).parent
        self.started = time.perf_counter()
        self.times: dict[str, float] = {}

    # -- steps -----------------------------------------------------------------------------------------------------
    def plan(self) -> None:
        c = self.cfg
        self.console.print(
            f"[bold]fedrag_app quick start[/]: federated fine-tuning of a RAG system ({c.generator.model} + "
            f"{c.retriever.model}) across {c.partition.num_partitions} institutions, {c.train.mode.upper()} with "
            f"{c.fed.strategy}, {c.fed.num_server_rounds} rounds, on embedded defaults.\n"
            "  1 index      the server's evaluation store and each institution's questions + Qdrant shard (kept)\n"
            f"  2 train      `flwr run .` (Flower simulation, {c.partition.num_partitions} SuperNodes); the server "
            f"evaluates before (round 0) and after the last round: {c.eval.web_questions_limit} Web Questions, "
            f"{c.eval.mmlu_limit} MMLU\n"
            "  3 ask        the fine-tuned system answers one question\n"
            "  4 summary    before and after, each difference with its 95% paired interval\n"
            f"Outputs go to {self.out} (a second run reuses the indexes)."
        )

    def check_data(self) -> None:
        """Stop at once, naming the folder and what it lacks, when the local data folder is missing or incomplete
        (with none configured the loaders use the hub, which needs network)."""
        folder = data_dir(str(self.flat.get("data.dir") or ""))
        if folder and (missing := missing_data(folder)):
            where = Path(folder).expanduser().resolve()
            lacks = "does not exist" if len(missing) == len(LAYOUT) else f"lacks {', '.join(missing)}"
            raise DataError(
                f"the data folder {where} {lacks}. The quick start needs {', '.join(LAYOUT)} (docs/DATA.md) in {WHERE}."
            )

    def _cli(self, *args: str) -> None:
        argv = [str(self.bin / "fedrag-app"), *args]
        done = subprocess.run(argv, env=child_env())
        if done.returncode != 0:
            raise FedRagAppError(f"`{' '.join(argv)}` failed (exit {done.returncode}); its error is above")

    def index(self) -> None:
        t0 = time.perf_counter()
        f = self.flat
        self.console.rule("1 · index")
        data = ["--data-dir", str(f["data.dir"])] if f.get("data.dir") else []
        model = ["--set", f"retriever.model={f['retriever.model']}"] if f.get("retriever.model") else []
        self._cli("index", "--limit", str(f["store.passages-limit"]), "--store", str(f["store.path"]), *model, *data)
        parts = Path(str(f["partition.dir"]))
        if (parts / "manifest.json").exists():
            self.console.print(f"[green]institutions already partitioned[/] in {parts}")
        else:
            keys = [
                a
                for k, v in f.items()
                if k.startswith(SHARD_KEYS) and k not in ("partition.dir", "data.dir")
                for a in ("--set", f"{k}={toml_value(v, k)}")
            ]
            self._cli("partition", "--out", str(parts), *keys, *data)
        self.times["index"] = time.perf_counter() - t0

    def train(self) -> list[dict]:
        """`flwr run .` with this run's config; follows rounds in metrics.jsonl; stops the local SuperLink at the
        end."""
        t0 = time.perf_counter()
        rounds, n = self.cfg.fed.num_server_rounds, self.cfg.partition.num_partitions
        self.console.rule(f"2 · federated fine-tuning: {n} institutions, {rounds} rounds")
        fed = Path(str(self.flat["fed.output-dir"]))
        shutil.rmtree(fed, ignore_errors=True)  # this run's checkpoints and rows only
        home = self.out / "flwr_home"
        env = child_env(fr.local_flwr_env(home, bin_dir=self.bin))
        flwr = str(self.bin / "flwr")
        fr.stop_local_superlink(str(home))  # a SuperLink an earlier, killed quickstart left behind
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` cleans up like Ctrl-C
        try:
            items = [f"{k}={toml_value(v, k)}" for k, v in self.flat.items()]
            run_id = fr.launch_run(
                str(self.root), "local", items, flwr=flwr, env=env, federation_config=f"num-supernodes={n}"
            )
            status = self._follow(fr, run_id, fed / "metrics.jsonl", rounds, flwr, env)
            log = subprocess.run(
                [flwr, "log", str(run_id), "local", "--show"], capture_output=True, text=True, timeout=120, env=env
            ).stdout
            write_text(fed / "flower.log", log)
            if status != fr.COMPLETED:
                self.console.print(log[-3000:])
                raise FedRagAppError(f"the Flower run {run_id} ended {status}: its log is in {fed / 'flower.log'}")
        finally:
            fr.stop_local_superlink(str(home))
            signal.signal(signal.SIGTERM, previous)
        rows = read_metrics(fed / "metrics.jsonl")
        if failed := [r["round"] for r in rows if r.get("round-failures", 0) > 0]:
            raise FedRagAppError(f"institutions failed in rounds {failed}: see {fed / 'flower.log'}")
        self.times["train"] = time.perf_counter() - t0
        return rows

    def _follow(self, fr, run_id: int, metrics: Path, rounds: int, flwr: str, env: dict) -> str:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rounds"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
        )
        status, checked = "starting", 0.0
        with Progress(*columns, console=self.console) as bar:
            task = bar.add_task(f"run {run_id}: starting Flower", total=rounds)
            while True:
                done = sum(r["round"] > 0 for r in read_metrics(metrics))  # round 0: the initial model's evaluation
                # every 15 s; every poll once the last round's row is in (the run is about to finish)
                if time.monotonic() - checked > (POLL_S if done >= rounds else STATUS_EVERY_S):
                    try:
                        status = fr.run_status("local", run_id, flwr=flwr, env=env)
                    except (fr.RunFailed, subprocess.TimeoutExpired):
                        status = "unreachable"
                    checked = time.monotonic()
                last = " (then the server evaluates)" if done == rounds - 1 and self.cfg.fed.server_eval else ""
                doing = f"round {min(done + 1, rounds)} of {rounds}{last}" if status == "running" else status
                bar.update(task, completed=done, description=f"run {run_id}: {doing}")
                if status.startswith("finished"):
                    return status
                time.sleep(POLL_S)

    def ask(self, rows: list[dict]) -> dict:
        from fedrag_app.config.runtime import apply_runtime
        from fedrag_app.federation.checkpoint import latest_checkpoint, load_checkpoint
        from fedrag_app.rag.generator import load_generator
        from fedrag_app.rag.pipeline import RagPipeline, open_store
        from fedrag_app.rag.retriever import load_retriever

        t0 = time.perf_counter()
        self.console.rule("3 · ask the fine-tuned system")
        ckpt = latest_checkpoint(Path(str(self.flat["fed.output-dir"])))
        if ckpt is None:
            raise FedRagAppError(f"the Flower run wrote no checkpoint under {self.flat['fed.output-dir']}")
        with self.console.status("loading models"):
            device = apply_runtime(self.cfg.runtime)
            self.gen = load_generator(self.cfg.generator, device=device)
            self.retriever = load_retriever(self.cfg.retriever, device=device)
        load_checkpoint(ckpt, self.gen, self.retriever)
        with open_store(self.cfg, self.retriever) as kb:
            result = RagPipeline(self.gen, self.retriever, kb, self.cfg.eval.top_k).answer(
                [self.question], max_new_tokens=self.cfg.generator.max_new_tokens
            )[0]
        self.console.print(f"[bold]Q:[/] {result.question}\n[bold green]A:[/] {result.answer}")
        for i, hit in enumerate(result.hits, 1):
            self.console.print(f"  [dim]{i}. {hit.title} ({hit.score:.3f}): {hit.text[:90]}…[/]")
        self.times["ask"] = time.perf_counter() - t0
        return {
            "question": result.question,
            "answer": result.answer,
            "checkpoint": str(ckpt.path),
            "passages": [h.title for h in result.hits],
        }

    def paired(self, rows: list[dict]) -> dict[str, dict[str, float]]:
        """The last round against round 0 on the same questions (the server's predictions/round-N.jsonl): per metric
        the mean difference and its 95% paired-bootstrap interval; {} without both files."""
        from fedrag_app.evaluation.paired import compare

        fed = Path(str(self.flat["fed.output-dir"]))
        files = [fed / "predictions" / f"round-{n}.jsonl" for n in (0, rows[-1]["round"] if rows else 0)]
        if not rows or not all(f.exists() for f in files):
            return {}
        before, after = ([json.loads(line) for line in f.read_text().splitlines() if line.strip()] for f in files)
        return compare(before, [after])

    def summary(self, rows: list[dict], answer: dict) -> dict:
        before = next((r for r in rows if r["round"] == 0), {})
        trained = [r for r in rows if r["round"] > 0]
        after = trained[-1] if trained else {}
        paired = self.paired(trained)
        table = Table(
            "metric",
            "before (round 0)",
            f"after (round {after.get('round', '–')})",
            "difference [95% paired interval]",
            title=f"server evaluation on the same {before.get('wq-n', 0):.0f} Web Questions and "
            f"{before.get('mmlu-circular-n', before.get('mmlu-loglik-n', 0)):.0f} MMLU questions",
        )
        for key in SHOWN:
            if key in before or key in after:
                p = paired.get(key)
                change = f"{p['diff']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]" if p else "–"
                table.add_row(key, *(f"{d[key]:.3f}" if key in d else "–" for d in (before, after)), change)
        for key in ("train-lsr-loss-mean", "train-ralt-loss-mean"):
            if any(key in r for r in trained):
                table.add_row(
                    f"{key[6:]} (round 1 → {len(trained)})",
                    *(f"{r[key]:.3f}" if key in r else "–" for r in (trained[0], trained[-1])),
                    "",
                )
        self.console.rule("4 · summary")
        self.console.print(table)
        if f1 := paired.get("wq-f1"):
            verdict = (
                "a gain larger than its uncertainty"
                if f1["low"] > 0
                else "a loss larger than its uncertainty"
                if f1["high"] < 0
                else "not distinguishable from no change on these questions"
            )
            self.console.print(
                f"[bold]Web Questions F1 {before['wq-f1']:.3f} → {after['wq-f1']:.3f}[/]: {f1['diff']:+.3f}, 95% "
                f"interval {f1['low']:+.3f} to {f1['high']:+.3f} over the same {f1['n']:.0f} questions: {verdict}."
            )
        fed, ckpt, store = Path(str(self.flat["fed.output-dir"])), Path(answer["checkpoint"]), self.flat["store.path"]
        total = time.perf_counter() - self.started
        self.console.print(
            f"Took {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in self.times.items())}).\n"
            f"[bold]Outputs[/]\n  checkpoints  {fed}/round-NNNN/{{adapter,retriever,state.json}} (last: {ckpt.name})\n"
            f"  metrics      {fed}/metrics.jsonl (round 0: before), plot {fed}/metrics.png, per-question "
            f"{fed}/predictions/round-N.jsonl\n"
            f"  Flower log   {fed}/flower.log\n"
            "[bold]Next[/]\n"
            f"  fedrag-app ask --store {store} --adapter {ckpt}/adapter --retriever {ckpt}/retriever"
            "          # questions from stdin, models loaded once (add --json for scripts)\n"
            f"  fedrag-app export --checkpoint {ckpt} --out {self.out}/export"
            "          # merged transformers model + sentence-transformers retriever\n"
            f"  fedrag-app evaluate --adapter {ckpt}/adapter --retriever {ckpt}/retriever --set store.path={store}\n"
            "  make run again reuses the indexes; --set key=value changes any run-config key "
            "(e.g. --set fed.num-server-rounds=4); docs/FEDERATION.md for full-size runs"
        )
        summary = {
            "before": before,
            "after": after,
            "paired": paired,
            "answer": answer,
            "seconds": {**self.times, "total": total},
            "run-config": self.flat,
        }
        write_json(self.out / "summary.json", summary)
        return summary

    def run(self) -> dict:
        self.check_data()
        self.plan()
        self.out.mkdir(parents=True, exist_ok=True)
        self.index()
        rows = self.train()
        answer = self.ask(rows)
        return self.summary(rows, answer)
