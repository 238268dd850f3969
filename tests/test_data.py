"""Data loaders on the real files, and bad input that must name the file and line."""

import pytest

from fedrag_app.config.app_config import DataConfig
from fedrag_app.core.errors import DataError
from fedrag_app.data.loaders import (
    CHOICE_LETTERS,
    QAExample,
    iter_passages,
    load_mmlu,
    load_passages,
    load_qa_jsonl,
    load_web_questions,
    write_qa_jsonl,
)


def test_web_questions_splits_have_their_published_sizes(data_dir):
    cfg = DataConfig(dir=str(data_dir))
    train, test = load_web_questions("train", cfg), load_web_questions("test", cfg)
    assert (len(train), len(test)) == (3778, 2032)
    assert train[0].question == "what is the name of justin bieber brother?"
    assert train[0].topic == "justin_bieber" and "Jaxon Bieber" in train[0].answers
    assert train[0].answers == ("Jazmyn Bieber", "Jaxon Bieber")


def test_the_training_target_is_one_gold_answer_each_in_its_turn(data_dir):
    """The joined list ("Jazmyn Bieber, Jaxon Bieber", FedRAG's target) can never exact-match a gold answer."""
    from dataclasses import replace

    from fedrag_app.evaluation.metrics import exact_match

    bieber = load_web_questions("train", DataConfig(dir=str(data_dir)))[0]
    assert [replace(bieber, turn=t).target for t in range(3)] == ["Jazmyn Bieber", "Jaxon Bieber", "Jazmyn Bieber"]
    assert exact_match(bieber.target, bieber.answers) == 1.0


def test_mmlu_global_facts_by_default_and_any_subject(data_dir):
    cfg = DataConfig(dir=str(data_dir))
    gf = load_mmlu(cfg)
    assert len(gf) == 100 and all(q.answer in CHOICE_LETTERS and len(q.choices) == 4 for q in gf)
    physics = load_mmlu(cfg, "high_school_physics", "test", limit=5)
    assert len(physics) == 5 and {q.subject for q in physics} == {"high_school_physics"}
    with pytest.raises(DataError, match="subject 'astrologie'"):
        load_mmlu(cfg, "astrologie")


def test_passages_stream_with_a_limit(data_dir):
    passages = list(iter_passages(DataConfig(dir=str(data_dir)), limit=3))
    assert [p.id for p in passages] == ["enwiki2015-12-0", "enwiki2015-12-1", "enwiki2015-12-2"]
    assert passages[0].title and passages[0].text


def test_a_corpus_that_is_not_utf8_names_file_and_line(tmp_path):
    corpus = tmp_path / "latin1.jsonl"
    corpus.write_bytes(b'{"id": "a", "title": "t", "text": "ok"}\n{"id": "b", "title": "Caf\xe9", "text": "x"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at column 26\)"):
        load_passages(DataConfig(corpus=str(corpus)))


def test_an_empty_corpus_is_an_error(tmp_path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the corpus holds no passages"):
        load_passages(DataConfig(corpus=str(corpus)))


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "q1", "answers": ["a"]}\n{"question": "q2", "answers": ["a"\n')
    with pytest.raises(DataError, match=r"qa\.jsonl:2: malformed JSON"):
        load_qa_jsonl(f)


def test_missing_field_names_file_line_and_field(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "q1", "answers": ["a"]}\n\n{"question": "q3"}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl:3: missing field 'answers'"):
        load_qa_jsonl(f)


def test_wrongly_typed_answers_are_rejected(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "q1", "answers": "a"}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl:1: field 'answers' must be a non-empty list"):
        load_qa_jsonl(f)


def test_missing_file_and_missing_folder_are_named(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.jsonl: file not found"):
        load_qa_jsonl(tmp_path / "nothing.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_web_questions("train", DataConfig(dir=str(tmp_path / "absent")))
    (tmp_path / "web_questions").mkdir()
    with pytest.raises(DataError, match=r"web_questions/test\.jsonl: file not found"):
        load_web_questions("test", DataConfig(dir=str(tmp_path)))


def test_mmlu_bad_answer_is_named(tmp_path):
    (tmp_path / "mmlu_global_facts").mkdir()
    (tmp_path / "mmlu_global_facts" / "test.jsonl").write_text(
        '{"question": "q", "choices": ["1","2","3","4"], "answer": "E"}\n'
    )
    with pytest.raises(DataError, match=r"test\.jsonl:1: field 'answer' must be A-D"):
        load_mmlu(DataConfig(dir=str(tmp_path)))


def test_offline_hub_fallback_says_how_to_use_local_files(monkeypatch):
    monkeypatch.delenv("FEDRAG_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="stanfordnlp/web_questions.*data.dir, \\$FEDRAG_DATA_DIR or --data-dir"):
        load_web_questions("test", DataConfig())


def test_partition_files_round_trip(tmp_path):
    examples = [QAExample("1", "q?", ("a", "b"), "t"), QAExample("2", "r?", ("c",), "")]
    write_qa_jsonl(tmp_path / "p.jsonl", examples)
    assert load_qa_jsonl(tmp_path / "p.jsonl") == examples
