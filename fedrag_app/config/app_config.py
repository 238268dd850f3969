"""One typed, frozen config for every entry point, validated once.

Flower's run-config is a flat dict of dotted kebab-case keys (``ralt.learning-rate``); the CLI takes the
same keys. ``AppConfig.from_flat`` is the only function that maps those keys onto the dataclasses below,
and it rejects unknown keys (with a suggestion), wrong types and out-of-range values. The dataclass
defaults are the truth: ``pyproject.toml``'s ``[tool.flwr.app.config]`` repeats them, and a test checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedrag_app.config.checks import check_federation_options, check_rank_options
from fedrag_app.config.query import QueryConfig
from fedrag_app.config.values import _coerce, _fraction, _help, _kebab, _one_of, _positive, flatten, parse_override  # noqa: F401  (re-exported: the CLI reads them here)
from fedrag_app.core.errors import ConfigError


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how computation runs."""

    device: str = _help("auto | cpu | cuda; auto picks CUDA when present", "auto")
    num_threads: int = _help("torch intra-op threads; 0 = OMP_NUM_THREADS if set, else one per core", 0)
    seed: int = _help("seed for python, numpy and torch", 1234)

    def __post_init__(self) -> None:
        _one_of("runtime", "device", self.device, ("auto", "cpu", "cuda"))
        _positive("runtime", "num_threads", self.num_threads, zero_ok=True)


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from: a local data folder (docs/DATA.md), or hub ids."""

    dir: str = _help("local data directory (web_questions/, mmlu/, wikipedia/); '' = $FEDRAG_DATA_DIR, else hub", "")
    web_questions: str = _help(
        "hub id of Web Questions, used when no local directory is set", "stanfordnlp/web_questions"
    )
    mmlu: str = _help("hub id of MMLU, used when no local directory is set", "cais/mmlu")
    corpus: str = _help("passage corpus: a JSONL file with id/title/text; '' = <dir>/wikipedia/passages.jsonl", "")


@dataclass(frozen=True)
class GeneratorConfig:
    """The causal LM and its LoRA adapter."""

    model: str = _help("short name, hub id or local path of a causal LM", "smollm2-135m-instruct")
    quantization: str = _help("none | 4bit | 8bit (bitsandbytes; 4bit = QLoRA)", "none")
    dtype: str = _help(
        "auto | float32 | bfloat16: the frozen base's dtype (auto = bfloat16 on CUDA, float32 on CPU); "
        "LoRA weights train and travel in float32",
        "auto",
    )
    adapter_path: str = _help("PEFT adapter folder to start from; '' = fresh LoRA from the keys below", "")
    lora_r: int = _help("LoRA rank", 8)
    lora_alpha: int = _help("LoRA alpha (scale = alpha / r)", 16)
    lora_dropout: float = _help("LoRA dropout", 0.05)
    lora_target_modules: tuple[str, ...] = _help("comma-separated module names LoRA wraps", ("q_proj", "v_proj"))
    max_new_tokens: int = _help("greedy generation length", 32)

    def __post_init__(self) -> None:
        _one_of("generator", "quantization", self.quantization, ("none", "4bit", "8bit"))
        _one_of("generator", "dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _positive("generator", "lora_r", self.lora_r)
        _positive("generator", "lora_alpha", self.lora_alpha)
        _fraction("generator", "lora_dropout", self.lora_dropout)
        _positive("generator", "max_new_tokens", self.max_new_tokens)
        if not self.lora_target_modules:
            raise ConfigError("run-config key 'generator.lora-target-modules' is empty: name at least one module")


@dataclass(frozen=True)
class RetrieverConfig:
    """The dual encoder: a query encoder and a context encoder (shared weights unless context-model is set)."""

    model: str = _help(
        "short name, hub id or local path of a sentence-transformers model (query encoder)", "all-minilm-l6-v2"
    )
    context_model: str = _help(
        "context encoder (embeds the store); '' = a frozen copy of the query encoder's start", ""
    )
    train_context_encoder: bool = _help(
        "LSR also trains the context encoder (centralized only: re-indexes the store)", False
    )
    train_top_layers: int = _help(
        "train only the top N transformer layers of the query encoder; 0 = all (2: 16 MB "
        "a message, not 92, and held-out LSR no worse: docs/LSR.md)",
        2,
    )
    wire_dtype: str = _help("float32 | float16: dtype of the retriever update nodes send back", "float32")

    def __post_init__(self) -> None:
        _positive("retriever", "train_top_layers", self.train_top_layers, zero_ok=True)
        _one_of("retriever", "wire_dtype", self.wire_dtype, ("float32", "float16"))


@dataclass(frozen=True)
class StoreConfig:
    """The Qdrant knowledge store: an embedded Qdrant Edge shard folder, or a Qdrant server URL."""

    path: str = _help("embedded shard folder; '' = <cache>/shards/<corpus>-<retriever>", "")
    url: str = _help("Qdrant server URL (http://host:6333) or ':memory:'; overrides path", "")
    collection: str = _help("collection name on a Qdrant server", "passages")
    index_batch_size: int = _help("passages per encoder forward while indexing (16 is fastest on CPU)", 16)
    passages_limit: int = _help("index only the first N passages; 0 = all", 0)
    mcp_url: str = _help(
        "an MCP server's streamable HTTP endpoint (http://host:port/mcp) to retrieve through instead of a local "
        "store: its store.mcp-tool answers each question (ask, serve, evaluate; not training, which needs vectors)",
        "",
    )
    mcp_tool: str = _help("the MCP server's search tool: arguments query and k, passages back", "search")

    def __post_init__(self) -> None:
        _positive("store", "index_batch_size", self.index_batch_size)
        _positive("store", "passages_limit", self.passages_limit, zero_ok=True)


@dataclass(frozen=True)
class TrainConfig:
    """What a training run does (centralized, or one client's local round)."""

    mode: str = _help("ralt (generator) | lsr (retriever) | ra-dit (both)", "ra-dit")
    ra_dit_schedule: str = _help(
        "alternate (LSR on odd rounds, RALT on even) | joint (LSR then RALT each round) | ralt-first (RALT then LSR "
        "each round: LSR's targets come from the generator RALT has just tuned, one that reads its passage)",
        "joint",
    )
    num_examples: int = _help(
        "questions per round: round r trains on the next N of a walk through all the node's "
        "questions (each pass in a fresh shuffle from runtime.seed; a resume continues it), one "
        "gold answer each, the pass picking which; 0 = all of them every round",
        0,
    )
    epochs: int = _help(
        "passes over this round's questions in each phase (R rounds thus pass epochs x R x "
        "num-examples / Q times over a node's Q questions)",
        1,
    )
    max_steps: int = _help("stop after N optimizer steps per phase; 0 = run the epochs", 0)
    output_dir: str = _help("where `fedrag-app train` writes adapter, retriever and metrics", "outputs/train")
    keep_optimizer_state: bool = _help("each node keeps its AdamW moments and steps across rounds, on the node", False)

    def __post_init__(self) -> None:
        _one_of("train", "mode", self.mode, ("ralt", "lsr", "ra-dit"))
        _one_of("train", "ra_dit_schedule", self.ra_dit_schedule, ("alternate", "joint", "ralt-first"))
        _positive("train", "num_examples", self.num_examples, zero_ok=True)
        _positive("train", "epochs", self.epochs)
        _positive("train", "max_steps", self.max_steps, zero_ok=True)


@dataclass(frozen=True)
class RaltConfig:
    """Retrieval-augmented LM fine-tuning of the generator (docs/ALGORITHMS.md, RALT)."""

    learning_rate: float = _help("AdamW learning rate for the LoRA weights", 1e-4)
    batch_size: int = _help("questions per step; each contributes top-k sequences", 4)
    top_k: int = _help("retrieved passages per question, one training sequence each", 2)
    max_seq_len: int = _help("tokens per sequence; the context is truncated, never the answer", 512)
    no_context_ratio: float = _help(
        "closed-book share of the mixture: per question of the round, this many extra examples with no "
        "retrieved passage (drawn from the round's questions)",
        0.0,
    )
    mmlu_ratio: float = _help(
        "multiple-choice share of the mixture: per question of the round, this many extra MMLU dev/val "
        "questions (the node's own share: partition's mmlu.jsonl, or node-config mmlu-path) answered with "
        "the letter after the same prompt evaluation uses, choices in a seeded random order; 0 = none",
        0.0,
    )
    mmlu_exclude_subjects: tuple[str, ...] = _help(
        "MMLU subjects never trained on (besides every eval.mmlu-subject other than 'all')", ("global_facts",)
    )
    length_grouping: bool = _help("group sequences of similar length into a batch to cut padding", True)
    forward_tokens: int = _help(
        "most padded tokens per forward/backward: a step's batch runs as micro-batches of whole "
        "sequences, gradients summed (same loss; bounds activation memory); 0 = all at once",
        768,
    )

    def __post_init__(self) -> None:
        _positive("ralt", "learning_rate", self.learning_rate)
        _positive("ralt", "forward_tokens", self.forward_tokens, zero_ok=True)
        _positive("ralt", "batch_size", self.batch_size)
        _positive("ralt", "top_k", self.top_k)
        _positive("ralt", "max_seq_len", self.max_seq_len)
        _fraction("ralt", "no_context_ratio", self.no_context_ratio)
        _positive("ralt", "mmlu_ratio", self.mmlu_ratio, zero_ok=True)


@dataclass(frozen=True)
class LsrConfig:
    """LM-supervised retrieval: trains the query encoder towards passages the LM finds useful."""

    learning_rate: float = _help(
        "AdamW learning rate for the retriever (1e-5 barely moves it, 3e-4 overfits: docs/LSR.md)", 1e-4
    )
    batch_size: int = _help("questions per step", 4)
    top_k: int = _help("candidate passages per question", 4)
    retriever_temperature: float = _help(
        "tau: p_R = softmax(cosine / tau); 0.05: H(p_R)/log k 0.72 at k=4, near the target's", 0.05
    )
    lm_temperature: float = _help(
        "beta: p_LSR = softmax(log p_LM(answer | passage, question) / beta); sum at 1.0: H/log k 0.60", 1.0
    )
    lm_score: str = _help(
        "sum | mean of answer-token log-probs (mean at beta 1: H(p_LSR)/log k 0.86, nearly uniform)", "sum"
    )
    kl_direction: str = _help(
        "lsr-retriever = KL(p_LSR || p_R) (REPLUG/Atlas) | retriever-lsr = KL(p_R || p_LSR)", "lsr-retriever"
    )
    max_seq_len: int = _help("tokens per scored sequence", 512)
    score_cache: bool = _help(
        "with train.mode = lsr (frozen generator), keep each sequence's LM score in "
        "<cache>/lm_scores.sqlite, keyed by the weights and token ids: rounds, seeds and runs "
        "score it once",
        True,
    )
    scorer_adapter: str = _help(
        "a PEFT adapter (local folder or hub id, e.g. a RALT adapter) that scores LSR's targets in place of the "
        "generator being trained: an untuned small LM answers about as well without the passage as with it, so its "
        "scores hardly tell passages apart; empty = the node's own generator",
        "",
    )
    one_per_article: bool = _help(
        "candidates from distinct articles: retrieve 4k, keep each article's best passage, rank the first k (passages "
        "of one article often say much the same, so the target has little to choose between)",
        False,
    )
    in_batch_negatives: bool = _help(
        "p_R over every candidate of the batch, the other questions' as negatives the target gives no mass (REPLUG's "
        "in-batch negatives; with lsr.kl-direction = lsr-retriever only)",
        False,
    )
    gate: bool = _help(
        "train only on questions whose best candidate beats no passage at all (log p_LM(answer | passage, question) "
        "> log p_LM(answer | question) + lsr.gate-margin): where no candidate helps the LM, its target says nothing "
        "about passages",
        False,
    )
    gate_margin: float = _help(
        "how far the best candidate must beat no passage for lsr.gate to keep a question, on lsr.lm-score's scale "
        "(nats per answer with 'sum', per answer token with 'mean'); docs/LSR.md's measured gate used 2 with 'sum'",
        0.0,
    )

    def __post_init__(self) -> None:
        _positive("lsr", "learning_rate", self.learning_rate)
        _positive("lsr", "batch_size", self.batch_size)
        if self.top_k < 2:
            raise ConfigError(f"run-config key 'lsr.top-k' = {self.top_k}: LSR needs at least 2 candidates")
        _positive("lsr", "retriever_temperature", self.retriever_temperature)
        _positive("lsr", "lm_temperature", self.lm_temperature)
        _one_of("lsr", "lm_score", self.lm_score, ("sum", "mean"))
        _one_of("lsr", "kl_direction", self.kl_direction, ("lsr-retriever", "retriever-lsr"))
        if self.in_batch_negatives and self.kl_direction != "lsr-retriever":
            raise ConfigError(
                "run-config key 'lsr.in-batch-negatives' = true needs lsr.kl-direction = 'lsr-retriever': "
                "KL(p_R || p_LSR) is infinite where the target gives a negative no mass"
            )
        _positive("lsr", "max_seq_len", self.max_seq_len)
        _positive("lsr", "gate_margin", self.gate_margin, zero_ok=True)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol (docs/ALGORITHMS.md, Evaluation)."""

    mmlu_subject: tuple[str, ...] = _help(
        "comma-separated MMLU subjects, each evaluated on its own: a subject name, or 'all' (a fixed sample of "
        "eval.mmlu-per-subject questions from each of the 57, reported overall and per category); the first keeps "
        "the plain 'mmlu-' metric names, each further one is prefixed 'mmlu-<subject>-'",
        ("global_facts",),
    )
    mmlu_split: str = _help("MMLU split: test | val | dev", "test")
    mmlu_limit: int = _help("first N MMLU questions of each subject; 0 = all", 0)
    mmlu_protocols: tuple[str, ...] = _help(
        "comma-separated MMLU scoring protocols: loglik (letter log-likelihood) | generate (letter parsed from "
        "greedy output) | circular (choices rotated through the 4 positions: no letter prior) | cloze "
        "(each choice's text as the answer, per-character log-likelihood: no letter prior)",
        ("loglik", "generate", "circular", "cloze"),
    )
    mmlu_broad_protocols: tuple[str, ...] = _help(
        "the protocols for eval.mmlu-subject = all (its 1,140 questions: generation alone would add ~40% to the "
        "evaluation's time, and it carries the letter prior as loglik does)",
        ("loglik", "circular", "cloze"),
    )
    mmlu_per_subject: int = _help("eval.mmlu-subject = all: questions sampled from each subject", 20)
    mmlu_sample_seed: int = _help(
        "eval.mmlu-subject = all: the sample's seed (fixed, so every run and model sees the same questions)", 0
    )
    web_questions_limit: int = _help("first N Web Questions test questions; 0 = all 2,032", 200)
    top_k: int = _help("passages put in the prompt", 2)
    recall_k: int = _help("k of retrieval answer-recall@k and MRR@k", 10)
    use_retrieval: bool = _help("false = closed-book baseline", True)
    batch_size: int = _help("prompts per forward pass", 8)

    def __post_init__(self) -> None:
        _one_of("eval", "mmlu_split", self.mmlu_split, ("test", "val", "dev"))
        _positive("eval", "mmlu_limit", self.mmlu_limit, zero_ok=True)
        _positive("eval", "mmlu_per_subject", self.mmlu_per_subject)
        if not self.mmlu_subject or len(set(self.mmlu_subject)) != len(self.mmlu_subject):
            raise ConfigError(
                f"run-config key 'eval.mmlu-subject' = {','.join(self.mmlu_subject)!r}: name each "
                "subject once, at least one"
            )
        for name in ("mmlu_protocols", "mmlu_broad_protocols"):
            for protocol in getattr(self, name):
                _one_of("eval", name, protocol, ("loglik", "generate", "circular", "cloze"))
            if not getattr(self, name):
                raise ConfigError(f"run-config key 'eval.{_kebab(name)}' is empty: name at least one protocol")
        _positive("eval", "web_questions_limit", self.web_questions_limit, zero_ok=True)
        _positive("eval", "top_k", self.top_k, zero_ok=True)
        _positive("eval", "recall_k", self.recall_k)
        _positive("eval", "batch_size", self.batch_size)


@dataclass(frozen=True)
class PartitionConfig:
    """How `fedrag-app partition` splits questions and documents across institutions."""

    num_partitions: int = _help("number of client partitions (institutions)", 3)
    scheme: str = _help("iid | dirichlet (non-IID over the question's Freebase topic cluster)", "iid")
    dirichlet_alpha: float = _help("Dirichlet concentration; smaller = more skewed", 0.5)
    heldout_fraction: float = _help("share of each partition kept as its local held-out split", 0.1)
    documents: str = _help(
        "topics (an article about a Freebase topic of an institution's questions lives there) | random (one owner "
        "drawn per article)",
        "topics",
    )
    doc_overlap: float = _help("share of the randomly owned articles also given to a second institution", 0.0)
    questions_per_client: int = _help(
        "keep the first N training questions of each client; 0 = all (~1,260 each for 3)", 48
    )
    passages_per_client: int = _help(
        "index the first N passages of each client's articles; 0 = all (~15k each for 3; "
        "encoded once into the embedding cache, ~45 min for the corpus on 2 cores)",
        0,
    )
    dir: str = _help("absolute output folder; '' = $FEDRAG_PARTITIONS_DIR, else ./data_partitions", "")

    def __post_init__(self) -> None:
        _positive("partition", "num_partitions", self.num_partitions)
        _positive("partition", "questions_per_client", self.questions_per_client, zero_ok=True)
        _positive("partition", "passages_per_client", self.passages_per_client, zero_ok=True)
        _one_of("partition", "scheme", self.scheme, ("iid", "dirichlet"))
        _one_of("partition", "documents", self.documents, ("topics", "random"))
        _positive("partition", "dirichlet_alpha", self.dirichlet_alpha)
        _fraction("partition", "heldout_fraction", self.heldout_fraction)
        _fraction("partition", "doc_overlap", self.doc_overlap)


@dataclass(frozen=True)
class FedConfig:
    """The federation: rounds, node counts, timeouts, checkpoints."""

    task: str = _help(
        "train (FedAvg rounds) | query (ask the nodes' shards questions and answer: query.* keys)", "train"
    )
    num_server_rounds: int = _help("FedAvg rounds", 2)
    fraction_train: float = _help("share of nodes sampled for training each round", 1.0)
    fraction_evaluate: float = _help("share of nodes sampled for federated evaluation; 0 = none", 1.0)
    min_nodes: int = _help("min train / evaluate / available nodes (1 = centralized)", 2)
    round_timeout_s: int = _help("seconds to wait for replies in a round before going on without the rest", 3600)
    output_dir: str = _help(
        "absolute folder for checkpoints, metrics and plots; '' = $FEDRAG_OUTPUT_DIR or ./outputs/fed", ""
    )
    resume: bool = _help("continue from the last complete checkpoint in output-dir", False)
    server_eval: bool = _help("server-side MMLU + Web Questions evaluation after each round", True)
    server_eval_every: int = _help("run the server-side evaluation every N rounds and after the last one", 1)
    server_eval_round_0: bool = _help(
        "also evaluate the initial global model (round 0: metrics.jsonl row, predictions/round-0.jsonl) at the "
        "start of a fresh run: the before of a before/after, paired question by question",
        False,
    )
    lora_aggregation: str = _help(
        "fedavg (average A and B) | ffa (A frozen at its seeded start, only B trains and "
        "travels: exact) | product (mean of B·A per layer, refactored by truncated SVD)",
        "fedavg",
    )

    personal_adapter: bool = _help(
        "each node also trains its own LoRA adapter stacked on the global one; it never "
        "leaves the node (kept in its state-path) and evaluation reports both models",
        False,
    )

    client_ranks: str = _help(
        "heterogeneous LoRA ranks, comma-separated by partition id (node i gets the i-th, cycling), "
        "e.g. '2,4,8'; each <= generator.lora-r, the global rank; '' = every node trains at "
        "generator.lora-r unless its node-config sets lora-rank",
        "",
    )
    strategy: str = _help(
        "fedavg | fedavgm | fedadam | fedyogi | fedadagrad (server optimizers) | fedmedian | fedtrimmedavg | krum | "
        "multikrum (robust to malicious nodes: docs/ROBUSTNESS.md); Flower's own",
        "fedavg",
    )
    server_learning_rate: float = _help("server step; 0 = the strategy's own (fedavgm 1.0, adaptive ones 1e-3)", 0.0)
    server_momentum: float = _help("fedavgm: momentum of the server's update, in [0, 1)", 0.9)
    server_beta_1: float = _help("fedadam | fedyogi: decay of the first moment, in [0, 1)", 0.9)
    server_beta_2: float = _help("fedadam | fedyogi: decay of the second moment, in [0, 1)", 0.99)
    server_tau: float = _help("fedadam | fedyogi | fedadagrad: added to sqrt(v); below it an update is damped", 1e-6)
    trim_beta: float = _help("fedtrimmedavg: share of nodes cut from each tail, per coordinate, in [0, 0.5)", 0.2)
    krum_malicious_nodes: int = _help(
        "krum | multikrum: malicious nodes tolerated per round (f); needs fed.min-nodes >= 2f + 3", 1
    )
    multikrum_select: int = _help("multikrum: updates averaged per round; 0 = fed.min-nodes - f", 0)
    update_norm_bound: float = _help(
        "clip each node's update (reply - the round's global weights) to this multiple of the round's median "
        "update norm, before any fed.strategy aggregates; 0 = off, else >= 1",
        0.0,
    )

    def __post_init__(self) -> None:
        _one_of("fed", "lora_aggregation", self.lora_aggregation, ("fedavg", "ffa", "product"))
        _one_of("fed", "task", self.task, ("train", "query"))
        for part in self.ranks:
            _positive("fed", "client_ranks", part)
        _positive("fed", "num_server_rounds", self.num_server_rounds)
        _fraction("fed", "fraction_train", self.fraction_train)
        _fraction("fed", "fraction_evaluate", self.fraction_evaluate)
        _positive("fed", "min_nodes", self.min_nodes)
        _positive("fed", "round_timeout_s", self.round_timeout_s)
        _positive("fed", "server_eval_every", self.server_eval_every)

    @property
    def ranks(self) -> tuple[int, ...]:
        """fed.client-ranks as integers (empty: no per-partition ranks)."""
        try:
            return tuple(int(p) for p in self.client_ranks.split(",") if p.strip())
        except ValueError as e:
            raise ConfigError(
                f"run-config key 'fed.client-ranks' = {self.client_ranks!r}: expected comma-separated "
                "integers, e.g. '2,4,8'"
            ) from e


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy with Flower's DP wrappers and mods, over every weight a client sends."""

    mode: str = _help(
        "off | client-clip (nodes clip, server adds noise) | server-clip (server clips and adds noise) | "
        "local (each node clips and adds its own noise)",
        "off",
    )
    clipping_norm: float = _help("L2 bound on one client's update (all sent weights together)", 1.0)
    noise_multiplier: float = _help("central modes: noise std = multiplier x clipping-norm / nodes per round", 1.0)
    delta: float = _help(
        "the delta at which epsilon is reported in the metrics (both modes) and, in local mode, each round's noise "
        "is calibrated",
        1e-5,
    )
    local_epsilon: float = _help(
        "local mode: epsilon of one round (noise by the analytic Gaussian mechanism; rounds composed exactly, not "
        "summed)",
        8.0,
    )

    def __post_init__(self) -> None:
        _one_of("dp", "mode", self.mode, ("off", "client-clip", "server-clip", "local"))
        _positive("dp", "clipping_norm", self.clipping_norm)
        _positive("dp", "noise_multiplier", self.noise_multiplier, zero_ok=True)
        _positive("dp", "local_epsilon", self.local_epsilon)
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"run-config key 'dp.delta' = {self.delta!r}: must be in (0, 1)")

    @property
    def central(self) -> bool:
        """The server adds the noise (and accounts for it): nodes are then averaged with equal weights."""
        return self.mode in ("client-clip", "server-clip")


SECTIONS: dict[str, type] = {
    "runtime": RuntimeConfig,
    "data": DataConfig,
    "generator": GeneratorConfig,
    "retriever": RetrieverConfig,
    "store": StoreConfig,
    "train": TrainConfig,
    "ralt": RaltConfig,
    "lsr": LsrConfig,
    "eval": EvalConfig,
    "partition": PartitionConfig,
    "fed": FedConfig,
    "dp": PrivacyConfig,
    "query": QueryConfig,
}


@dataclass(frozen=True)
class AppConfig:
    """Everything a run needs. Build it once with ``from_flat`` and pass the sub-configs down."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ralt: RaltConfig = field(default_factory=RaltConfig)
    lsr: LsrConfig = field(default_factory=LsrConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    dp: PrivacyConfig = field(default_factory=PrivacyConfig)
    query: QueryConfig = field(default_factory=QueryConfig)

    def __post_init__(self) -> None:
        check_federation_options(self)  # DP, LoRA aggregation, ranks and fed.strategy: which combine

    def node_rank(self, partition_id: int, node_rank: int | None = None) -> int:
        """The LoRA rank a node trains: its node-config lora-rank, else fed.client-ranks by partition id, else
        generator.lora-r (the global rank, what the server keeps and sends)."""
        if node_rank is not None:
            check_rank_options(self, "node-config key 'lora-rank'", node_rank)
            return node_rank
        ranks = self.fed.ranks
        return ranks[partition_id % len(ranks)] if ranks else self.generator.lora_r

    def for_rank(self, rank: int) -> AppConfig:
        """A node's own config: its generator adapter at ``rank`` (alpha unchanged: the scale becomes alpha / rank).
        fed.client-ranks, already resolved to this rank, is dropped: it is checked against the global rank."""
        if rank == self.generator.lora_r:
            return self
        return self.replace(
            generator=dataclasses.replace(self.generator, lora_r=rank),
            fed=dataclasses.replace(self.fed, client_ranks=""),
        )

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], *, source: str = "run-config") -> AppConfig:
        """Build from dotted kebab-case keys (``{"ralt.learning-rate": 1e-4}``); unknown keys are errors."""
        grouped: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        known = all_keys()
        for key, raw in flat.items():
            section, _, name = key.partition(".")
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(f"{source} key '{key}' is unknown{did_you_mean}")
            target = _field(SECTIONS[section], name.replace("-", "_"))
            grouped[section][target.name] = _coerce(f"{source} key '{key}'", raw, target.type)
        return cls(**{name: SECTIONS[name](**values) for name, values in grouped.items()})

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> AppConfig:
        """Read a TOML file of the same keys (nested tables or dotted keys), then apply overrides."""
        return cls.from_flat({**toml_keys(path), **(overrides or {})}, source=str(path))

    def to_flat(self) -> dict[str, Any]:
        """The inverse of ``from_flat``: dotted kebab-case keys with run-config-compatible values."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            sub = getattr(self, section)
            for f in fields(sub):
                value = getattr(sub, f.name)
                out[f"{section}.{_kebab(f.name)}"] = ",".join(value) if isinstance(value, tuple) else value
        return out

    def changed(self) -> dict[str, Any]:
        """The keys whose values differ from the defaults (what a query run is told: the rest it knows)."""
        defaults = AppConfig().to_flat()
        return {k: v for k, v in self.to_flat().items() if v != defaults[k]}

    def replace(self, **sections: Any) -> AppConfig:
        """A copy with whole sections replaced, e.g. ``cfg.replace(store=StoreConfig(path=...))``."""
        return dataclasses.replace(self, **sections)


def toml_keys(path: str | Path) -> dict[str, Any]:
    """The run-config keys a TOML file sets, flat and unchecked: a file of those keys (nested tables or dotted keys)
    or a pyproject.toml (its [tool.flwr.app.config])."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from e
    return flatten(doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", doc))


def all_keys() -> list[str]:
    """Every dotted kebab-case key the app reads."""
    return [f"{s}.{_kebab(f.name)}" for s, cls in SECTIONS.items() for f in fields(cls)]


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in fields(cls):
        if f.name == name:
            return f
    raise AssertionError(f"{cls.__name__} has no field {name}")
