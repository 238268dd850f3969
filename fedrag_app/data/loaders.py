"""Data: Web Questions, MMLU and a passage corpus, from a local data folder (LAYOUT, docs/DATA.md) or the hub.

One function per dataset hides the source: a local directory (``data.dir``, else $FEDRAG_DATA_DIR) wins;
without one, the hub ids in DataConfig are loaded with `datasets` (for users with network). Every bad line,
missing field or missing file is a DataError naming the file and line.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fedrag_app.config.app_config import AppConfig, DataConfig
from fedrag_app.core.atomic import write_text
from fedrag_app.core.environment import data_dir
from fedrag_app.core.errors import DataError

CHOICE_LETTERS = ("A", "B", "C", "D")  # an MMLU question's choices, in order: the one list of them
# The files of a local data folder every run reads (docs/DATA.md); mmlu_<subject>/ folders are optional.
LAYOUT = (
    "web_questions/train.jsonl",
    "web_questions/test.jsonl",
    "mmlu/test.jsonl",
    "mmlu/dev.jsonl",
    "mmlu/val.jsonl",
    "wikipedia/passages.jsonl",
)
WHERE = (
    "../shared/data beside the checkout (what `make run` uses), or any folder named by data.dir, $FEDRAG_DATA_DIR "
    "or --data-dir"
)


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    answers: tuple[str, ...]
    topic: str  # the question's Freebase topic key ("justin_bieber"); '' if unknown
    turn: int = 0  # which gold answer is the training target (local_round sets it from the pass over the data)

    @property
    def target(self) -> str:
        """The training answer: ONE gold answer, answers[turn mod len], so every answer gets its turn across
        passes. A model taught to emit all of them joined (", ") could never exact-match a gold answer (32% of Web
        Questions train questions have several). EM/F1 still score against all answers.
        """
        return self.answers[self.turn % len(self.answers)]


@dataclass(frozen=True)
class MmluQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"
    subject: str
    id: str = ""  # "<subject>/<split>/<n>": the n-th question of that subject and split, in file order


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


def local_dir(cfg: DataConfig) -> Path | None:
    """The configured local data folder, or None (meaning: the hub)."""
    folder = data_dir(cfg.dir)
    if not folder:
        return None
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise DataError(
            f"data folder {path} does not exist (from data.dir or $FEDRAG_DATA_DIR): it should hold "
            f"{', '.join(LAYOUT)} (docs/DATA.md)"
        )
    return path


def missing_data(folder: str | Path) -> list[str]:
    """The LAYOUT files a local data folder lacks: all of them when the folder does not exist."""
    return [name for name in LAYOUT if not (Path(folder).expanduser() / name).is_file()]


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) per non-blank line; errors name ``file:line``."""
    path = Path(path)
    try:
        f = path.open("rb")  # decoded line by line, so a byte that is not UTF-8 is reported at its line
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "save the file as UTF-8"
                ) from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for name in required:
                if name not in obj:
                    raise DataError(f"{path}:{lineno}: missing field '{name}'")
            yield lineno, obj


def _topic(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1] if url else ""


def _qa(obj: dict, where: str) -> QAExample:
    answers = obj["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: field 'answers' must be a non-empty list of strings")
    return QAExample(
        str(obj.get("id", "")),
        str(obj["question"]),
        tuple(answers),
        str(obj.get("topic") or _topic(obj.get("url", ""))),
    )


def load_qa_jsonl(path: str | Path, limit: int = 0) -> list[QAExample]:
    """Question/answers JSONL (Web Questions layout, or a client partition written by ``write_qa_jsonl``)."""
    out = []
    for lineno, obj in read_jsonl(path, ("question", "answers")):
        out.append(_qa(obj, f"{path}:{lineno}"))
        if limit and len(out) >= limit:
            break
    return out


def write_qa_jsonl(path: str | Path, examples: Iterable[QAExample]) -> None:
    rows = (
        json.dumps({"id": e.id, "question": e.question, "answers": list(e.answers), "topic": e.topic}) for e in examples
    )
    write_text(path, "".join(r + "\n" for r in rows))


def load_web_questions(split: str, cfg: DataConfig, limit: int = 0) -> list[QAExample]:
    """Web Questions train (3,778) or test (2,032), in file order."""
    if split not in ("train", "test"):
        raise DataError(f"Web Questions has splits 'train' and 'test', not {split!r}")
    folder = local_dir(cfg)
    if folder is not None:
        examples = load_qa_jsonl(folder / "web_questions" / f"{split}.jsonl", limit)
    else:
        rows = _hub(cfg.web_questions, split=split)
        examples = [_qa(r, f"{cfg.web_questions}[{split}][{i}]") for i, r in enumerate(rows)]
        examples = [QAExample(f"wq-{split}-{i}", e.question, e.answers, e.topic) for i, e in enumerate(examples)]
    return examples[:limit] if limit else examples


def load_mmlu(
    cfg: DataConfig, subject: str = "global_facts", split: str = "test", limit: int = 0
) -> list[MmluQuestion]:
    """MMLU questions of one subject, or of every subject ('all'), and one split (test / val / dev), in file order."""
    folder = local_dir(cfg)
    if folder is not None:
        own = folder / f"mmlu_{subject}" / f"{split}.jsonl"
        path = own if own.exists() else folder / "mmlu" / f"{split}.jsonl"
        rows = [
            (f"{path}:{n}", o)
            for n, o in read_jsonl(path, ("question", "choices", "answer"))
            if path == own or subject == "all" or o.get("subject") == subject
        ]
    else:
        hub_split = {"val": "validation"}.get(split, split)
        rows = [(f"{cfg.mmlu}[{subject}][{i}]", r) for i, r in enumerate(_hub(cfg.mmlu, subject, split=hub_split))]
    if not rows:
        raise DataError(
            f"MMLU subject {subject!r} has no {split} questions in {folder or cfg.mmlu} (subjects are "
            f"names like 'global_facts', 'high_school_physics', or 'all')"
        )
    out, seen = [], Counter()
    for where, obj in rows:
        q = _mmlu(obj, where, subject if subject != "all" else str(obj.get("subject", "")))
        if subject == "all" and not q.subject:
            raise DataError(f"{where}: field 'subject' is needed when eval.mmlu-subject is 'all'")
        out.append(dataclasses.replace(q, id=f"{q.subject}/{split}/{seen[q.subject]}"))
        seen[q.subject] += 1
    return out[:limit] if limit else out


def load_mmlu_pool(cfg: DataConfig, exclude: Iterable[str]) -> list[MmluQuestion]:
    """MMLU dev and val questions of every subject not in ``exclude``: multiple-choice training material. MMLU's
    splits share a few questions word for word (32 of the 1,801 dev and val questions outside global_facts have a
    copy in test); those copies are left out, so no question evaluation reads is ever trained on."""
    excluded = set(exclude)
    tested = {(q.question, tuple(q.choices)) for q in load_mmlu(cfg, "all", "test")}
    return [
        q
        for split in ("dev", "val")
        for q in load_mmlu(cfg, "all", split)
        if q.subject not in excluded and (q.question, tuple(q.choices)) not in tested
    ]


def excluded_mmlu_subjects(cfg: AppConfig) -> set[str]:
    """MMLU subjects never trained on: ralt.mmlu-exclude-subjects and every evaluated subject but 'all'."""
    return set(cfg.ralt.mmlu_exclude_subjects) | (set(cfg.eval.mmlu_subject) - {"all"})


def load_mmlu_jsonl(path: str | Path) -> list[MmluQuestion]:
    """A node's multiple-choice questions (MMLU layout: question, choices, answer, subject, id)."""
    return [
        _mmlu(obj, f"{path}:{n}", str(obj.get("subject", "")), str(obj.get("id", "")))
        for n, obj in read_jsonl(path, ("question", "choices", "answer"))
    ]


def write_mmlu_jsonl(path: str | Path, questions: Iterable[MmluQuestion]) -> None:
    rows = (
        json.dumps(
            {"id": q.id, "subject": q.subject, "question": q.question, "choices": list(q.choices), "answer": q.answer}
        )
        for q in questions
    )
    write_text(path, "".join(r + "\n" for r in rows))


def _mmlu(obj: dict, where: str, subject: str, id: str = "") -> MmluQuestion:
    choices, answer = obj["choices"], obj["answer"]
    if not isinstance(choices, list) or len(choices) != len(CHOICE_LETTERS):
        raise DataError(f"{where}: field 'choices' must be a list of {len(CHOICE_LETTERS)} strings")
    if isinstance(answer, int) and 0 <= answer < len(CHOICE_LETTERS):
        answer = CHOICE_LETTERS[answer]  # the hub's cais/mmlu stores the index
    if answer not in CHOICE_LETTERS:
        raise DataError(f"{where}: field 'answer' must be A-D or 0-3, got {answer!r}")
    return MmluQuestion(str(obj["question"]), tuple(str(c) for c in choices), answer, subject, id)


def corpus_path(cfg: DataConfig) -> Path:
    """The passages JSONL: ``data.corpus`` if set, else <data dir>/wikipedia/passages.jsonl."""
    if cfg.corpus:
        return Path(cfg.corpus).expanduser().resolve()
    folder = local_dir(cfg)
    if folder is None:
        raise DataError(
            "no passage corpus: set data.corpus to a JSONL file (id/title/text) or data.dir / $FEDRAG_DATA_DIR"
        )
    return folder / "wikipedia" / "passages.jsonl"


def iter_passages(cfg: DataConfig, limit: int = 0) -> Iterator[Passage]:
    """Stream passages (id, title, text) from the corpus JSONL, in file order."""
    path = corpus_path(cfg)
    for n, (_lineno, obj) in enumerate(read_jsonl(path, ("id", "text")), 1):
        yield Passage(str(obj["id"]), str(obj.get("title", "")), str(obj["text"]))
        if limit and n >= limit:
            return


def load_passages(cfg: DataConfig, limit: int = 0) -> list[Passage]:
    """All passages (or the first ``limit``), read and checked before any model loads; an empty corpus is an error."""
    passages = list(iter_passages(cfg, limit))
    if not passages:
        raise DataError(f"{corpus_path(cfg)}: the corpus holds no passages (expected JSONL lines with id/title/text)")
    return passages


def _hub(dataset_id: str, name: str | None = None, *, split: str) -> list[dict]:
    """Load a hub dataset split; offline or unreachable is a DataError saying how to use local files."""
    import datasets

    try:
        return list(datasets.load_dataset(dataset_id, name, split=split))
    except Exception as e:  # datasets raises many unrelated types for "cannot reach the hub"
        raise DataError(
            f"cannot load {dataset_id!r} ({name or 'default'}, {split}) from the hub: {type(e).__name__}: {e}. "
            f"Offline? Put the data in a local folder ({', '.join(LAYOUT)}; docs/DATA.md): {WHERE}."
        ) from e
