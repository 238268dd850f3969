"""One local round of training: what a federated client does each round, and what centralized training repeats.

Centralized training is the one-client case: ``fedrag-app train`` calls this function round after round on
all the data; a ClientApp calls it once per server round on its partition. Either way a round trains on the
next train.num-examples questions of a walk through all of them (round_examples), never the same first N. Seeding
from seed + round makes the same inputs give the same weights, which is what lets a test prove the two paths agree.
It trains the models in place and returns the round's metrics; what travels is the federation's business
(federation/exchange.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass

from fedrag_app.config.app_config import AppConfig, TrainConfig
from fedrag_app.core.torch_runtime import seed_everything
from fedrag_app.data.loaders import MmluQuestion, QAExample
from fedrag_app.rag.generator import Generator, set_lora_a_trainable
from fedrag_app.rag.knowledge_store import KnowledgeStore
from fedrag_app.rag.retriever import DualEncoder
from fedrag_app.training.lsr import train_lsr
from fedrag_app.training.ralt import mixture_fits, train_ralt
from fedrag_app.training.score_cache import ScoreCache, default_path


@dataclass
class RoundResult:
    metrics: dict[str, float]  # scalars only: never text from the data
    num_examples: int  # the FedAvg weight
    example_ids: tuple[str, ...] = ()  # which questions this round trained on (stays on the node: never in a reply)


def phases(cfg: TrainConfig, server_round: int) -> list[str]:
    """Which trainers run this round: RALT, LSR, or RA-DIT's joint (LSR then RALT), ralt-first or alternating
    schedule."""
    if cfg.mode != "ra-dit":
        return [cfg.mode]
    if cfg.ra_dit_schedule == "joint":
        return ["lsr", "ralt"]  # retriever first, so RALT retrieves with the updated retriever
    if cfg.ra_dit_schedule == "ralt-first":
        return ["ralt", "lsr"]  # generator first, so LSR's targets come from a generator that reads its passage
    return ["lsr"] if server_round % 2 == 1 else ["ralt"]


def walk(n_items: int, per_round: int, key: str, server_round: int) -> list[tuple[int, int]]:
    """(pass index, item index) at each position of absolute round ``server_round`` (1-based) in an endless walk
    through ``n_items`` items, ``per_round`` (<= n_items) a round, each pass in its own shuffle (seeded by ``key`` and
    the pass index), so every item comes up once per pass. A round that straddles two passes never takes an item
    twice: the next pass puts the items the round already took from the previous one at its end (their shuffled
    order kept). A pure function of its arguments, so a resumed run continues exactly where it stopped."""
    if server_round < 1:
        raise ValueError(f"server_round is 1-based, got {server_round}")
    if n_items == 0 or per_round == 0:
        return []
    first, last = (server_round - 1) * per_round, server_round * per_round
    orders: list[list[int]] = []
    for pass_index in range((last - 1) // n_items + 1):
        order = list(range(n_items))
        random.Random(f"{key}/{pass_index}").shuffle(order)  # str seeds: no seed+1 overlap
        boundary = pass_index * n_items
        taken = boundary - (boundary // per_round) * per_round  # items of the previous pass in the same round
        if pass_index and taken:
            tail = set(orders[-1][n_items - taken :])
            order = [i for i in order if i not in tail] + [i for i in order if i in tail]
        orders.append(order)
    return [(p // n_items, orders[p // n_items][p % n_items]) for p in range(first, last)]


def round_examples(examples: list[QAExample], num_examples: int, seed: int, server_round: int) -> list[QAExample]:
    """The questions a node trains on in absolute round ``server_round``: the next ``num_examples`` of the walk
    through all its questions (``walk``); 0 (or more than the node holds) = all of them every round, round r being
    pass r - 1. Each copy's target is its pass-th gold answer (QAExample.turn), so every answer of a many-answer
    question gets its turn."""
    per_round = min(num_examples, len(examples)) if num_examples else len(examples)
    return [
        dataclasses.replace(examples[i], turn=pass_index)
        for pass_index, i in walk(len(examples), per_round, f"rotation/{seed}", server_round)
    ]


def round_mmlu(questions: list[MmluQuestion], count: int, seed: int, server_round: int) -> list[MmluQuestion]:
    """The mixture's multiple-choice questions of a round: the next ``count`` of a walk of their own."""
    if not questions or count <= 0:
        return []
    per_round = min(count, len(questions))
    return [questions[i] for _, i in walk(len(questions), per_round, f"mmlu-rotation/{seed}", server_round)]


def _score_cache(cfg: AppConfig):
    """The LM-score cache when the generator stays frozen all run (train.mode = lsr), else nothing (None)."""
    if cfg.train.mode == "lsr" and cfg.lsr.score_cache:
        return ScoreCache(default_path())
    return contextlib.nullcontext()


def run_local_round(
    cfg: AppConfig,
    gen: Generator,
    retriever: DualEncoder,
    store: KnowledgeStore,
    examples: list[QAExample],
    *,
    server_round: int = 1,
    optimizer_state: dict | None = None,
    mmlu: list[MmluQuestion] = (),
) -> RoundResult:
    """Train in place per cfg.train (mode, schedule, epochs, max steps) on this round's share of ``examples``
    (all of the node's questions: round_examples picks the share from the absolute ``server_round``).

    ``optimizer_state`` (train.keep-optimizer-state): {phase: OptimizerState}, read and updated in place, so each
    phase's AdamW continues from the last round; None = fresh optimizers. ``mmlu``: the node's multiple-choice
    questions; each RALT phase mixes in ralt.mmlu-ratio of them per question of the round."""
    seed = cfg.runtime.seed + server_round
    seed_everything(seed)
    set_lora_a_trainable(gen, cfg.fed.lora_aggregation != "ffa")
    examples = round_examples(examples, cfg.train.num_examples, cfg.runtime.seed, server_round)
    fitting = mixture_fits(gen.tokenizer, list(mmlu), cfg.ralt.max_seq_len)
    mixed = round_mmlu(fitting, round(cfg.ralt.mmlu_ratio * len(examples)), cfg.runtime.seed, server_round)
    start = time.perf_counter()
    metrics: dict[str, float] = {"server-round": float(server_round)}

    def kept(phase: str) -> dict | None:  # this phase's AdamW state, or None: a fresh optimizer
        return None if optimizer_state is None else optimizer_state.setdefault(phase, {})

    round_phases = phases(cfg.train, server_round)
    for phase in round_phases:
        if phase == "lsr":
            with _score_cache(cfg) as cache:
                metrics.update(
                    train_lsr(
                        gen,
                        retriever,
                        store,
                        examples,
                        cfg.lsr,
                        epochs=cfg.train.epochs,
                        max_steps=cfg.train.max_steps,
                        seed=seed,
                        cache=cache,
                        optimizer_state=kept("lsr"),
                    )
                )
        else:
            metrics.update(
                train_ralt(
                    gen,
                    retriever,
                    store,
                    examples,
                    cfg.ralt,
                    epochs=cfg.train.epochs,
                    max_steps=cfg.train.max_steps,
                    seed=seed,
                    optimizer_state=kept("ralt"),
                    mmlu=mixed,
                )
            )
    metrics["local-seconds"] = time.perf_counter() - start
    # the FedAvg weight counts what the update learned from: an LSR-only round (train.mode = lsr, or RA-DIT's
    # alternate schedule) learned from the questions with k candidates that lsr.gate kept, not from all it was given
    learned = int(metrics["lsr-examples"]) if round_phases == ["lsr"] else len(examples)
    return RoundResult(metrics=metrics, num_examples=learned, example_ids=tuple(e.id for e in examples))
