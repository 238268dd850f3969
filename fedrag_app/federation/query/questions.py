"""The questions a query run asks: query.question, else query.questions-path (answers optional), else the Web
Questions test split."""

from __future__ import annotations

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.errors import DataError
from fedrag_app.data.loaders import QAExample, load_web_questions, read_jsonl


def load_questions(cfg: AppConfig) -> list[QAExample]:
    """query.question, else query.questions-path (answers optional), else the Web Questions test split."""
    q = cfg.query
    if q.question.strip():
        return [QAExample("q-1", q.question.strip(), (), "")]
    if not q.questions_path:
        return load_web_questions("test", cfg.data, q.questions_limit)
    out = []
    for lineno, obj in read_jsonl(q.questions_path, ("question",)):
        answers = obj.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{q.questions_path}:{lineno}: field 'answers' must be a list of strings")
        out.append(QAExample(str(obj.get("id") or f"q-{lineno}"), str(obj["question"]), tuple(answers), ""))
        if q.questions_limit and len(out) >= q.questions_limit:
            break
    return out
