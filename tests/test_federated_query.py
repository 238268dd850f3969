"""Federated RAG at question time, without a runtime: the merges checked by hand, the reply checks, the opt-in rule,
and a node's batched reply read back by the server's reader (real retriever, real Qdrant Edge shard)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from fedrag_app.config.app_config import AppConfig
from fedrag_app.core.errors import ConfigError
from fedrag_app.data.loaders import QAExample
from fedrag_app.federation.query.answering import score_answers
from fedrag_app.federation.query.merge import MergedHit, NodeHit, merge, merge_by_score, merge_rrf
from fedrag_app.federation.query.replies import REFUSAL, opted_in, pack_hits, read_reply, unpack_hits
from tests.flower_helpers import message, reply


def hits(node: int, *passages: tuple[str, float]) -> list[NodeHit]:
    return [NodeHit(pid, f"T{pid}", f"text {pid}", score, rank, node) for rank, (pid, score) in enumerate(passages, 1)]


A = hits(1, ("a", 0.90), ("b", 0.80), ("c", 0.70))
B = hits(2, ("b", 0.85), ("d", 0.95))


def test_rrf_by_hand():
    """k = 60, 1-based ranks: a = 1/61, b = 1/62 + 1/61 (in both lists), c = 1/63, d = 1/62."""
    merged = merge_rrf([A, B], k=60)
    assert [h.id for h in merged] == ["b", "a", "d", "c"]
    assert [h.score for h in merged] == pytest.approx([1 / 62 + 1 / 61, 1 / 61, 1 / 62, 1 / 63])
    assert [s.node for s in merged[0].sources] == [2, 1], "b's best source first (score 0.85 at node 2)"
    assert merged[0].as_row()["node"] == 2 and merged[0].as_row()["nodes"] == [2, 1]
    k1 = merge_rrf([A, B], k=1, top=2)  # a small k weighs the top ranks more: 1/2 + 1/3 for b vs 1/2 for a and d
    assert [h.id for h in k1] == ["b", "a"] and k1[0].score == pytest.approx(1 / 3 + 1 / 2)


def test_score_sort_by_hand_keeps_each_passage_once_at_its_best_score():
    for lists in ([A, B], [B, A]):  # b: 0.80 at node 1, 0.85 at node 2, whichever reply came first
        merged = merge_by_score(lists, top=3)
        assert [(h.id, h.score) for h in merged] == [("d", 0.95), ("a", 0.90), ("b", 0.85)]
    assert merge([A, B], "score") == merge_by_score([A, B]) and merge([A, B], "rrf", rrf_k=60) == merge_rrf([A, B])
    assert merge([[], []], "rrf") == []


def test_a_node_reply_round_trips_and_bad_replies_are_refused_by_name():
    docs = pack_hits([A, [], B])
    back = unpack_hits(docs, 3, top_k=3, node=5, partition=1)
    assert [[h.id for h in q] for q in back] == [["a", "b", "c"], [], ["b", "d"]]
    assert [h.rank for h in back[2]] == [1, 2] and {h.node for q in back for h in q} == {5}
    with pytest.raises(ValueError, match="counts"):
        unpack_hits(docs, 3, top_k=2, node=5)  # 3 passages for one question, but 2 were asked
    with pytest.raises(ValueError, match="counts"):
        unpack_hits(docs, 2, top_k=3, node=5)  # answers for 3 questions, 2 were asked
    for key, value, named in [
        ("texts", ["x", "y"], "texts"),
        ("scores", [0.1] * 4 + [float("nan")], "finite"),
        ("titles", [1, 2, 3, 4, 5], "strings"),
        ("texts", ["x" * 20_001] * 5, "longer"),
    ]:
        with pytest.raises(ValueError, match=named):
            unpack_hits({**docs, key: value}, 3, top_k=3, node=5)
    with pytest.raises(ValueError, match="lacks"):
        unpack_hits({k: v for k, v in docs.items() if k != "scores"}, 3, top_k=3, node=5)


def test_only_a_simulated_node_can_be_opted_in_by_the_run_config():
    sim = {"partition-id": 1, "num-partitions": 3}
    assert opted_in(sim, False, 1, frozenset({0, 1}))
    assert not opted_in(sim, False, 2, frozenset({0, 1}))
    own = {**sim, "data-path": "/x/train.jsonl", "store-path": "/x/shard"}  # a SuperNode with its own node-config
    assert not opted_in(own, False, 1, frozenset({1})), "the run's submitter cannot opt an institution in"
    assert opted_in({**own, "federated-retrieval": True}, True, 1, frozenset())
    assert not opted_in({**sim, "federated-retrieval": False}, False, 1, frozenset({1}))


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("query.opted-in-partitions", "0;1", "opted-in-partitions"),
        ("query.top-k-per-node", 101, "at most 100"),
        ("query.merge", "borda", "query.merge"),
        ("fed.task", "ask", "fed.task"),
    ],
)
def test_query_keys_are_checked(key, value, named):
    with pytest.raises(ConfigError, match=named):
        AppConfig.from_flat({key: value})


@pytest.mark.parametrize("eval_key, value", [("eval.top-k", 6), ("eval.recall-k", 12)])
def test_a_query_run_refuses_fewer_passages_per_node_than_it_evaluates(eval_key, value):
    """The merge keeps max(eval.top-k, eval.recall-k) passages: below that, the score merge is not one index's top-k
    and recall@k counts fewer than k passages."""
    query = {"fed.task": "query", "query.top-k-per-node": 5, "eval.top-k": 2, "eval.recall-k": 5}
    assert AppConfig.from_flat(query).query.top_k_per_node == 5, "exactly the evaluation depth is enough"
    with pytest.raises(ConfigError, match=r"'query.top-k-per-node' = 5 .*'eval.top-k'.*'eval.recall-k'"):
        AppConfig.from_flat({**query, eval_key: value})
    assert AppConfig.from_flat({**query, eval_key: value, "fed.task": "train"}), "a training run never merges lists"


def _reply(content: RecordDict | Error) -> Message:
    return reply(content, 9, message_type="query.retrieve")


def test_the_server_reader_counts_refusals_errors_and_bad_replies():
    from fedrag_app.flower.records import metric_record

    good = RecordDict(
        {"docs": ConfigRecord({**pack_hits([A]), "partition-id": 2}), "metrics": metric_record({"node-seconds": 0.5})}
    )
    kind, lists, seconds, problem = read_reply(_reply(good), 1, 3)
    assert (kind, seconds, problem) == ("ok", 0.5, None) and [h.partition for h in lists[0]] == [2, 2, 2]
    assert read_reply(_reply(Error(2, f"<class 'ConfigError'>:<'{REFUSAL}: ...'>")), 1, 3)[0] == "refused"
    assert read_reply(_reply(Error(2, "shard locked")), 1, 3)[0] == "error"
    extra = RecordDict(
        {
            "docs": ConfigRecord(pack_hits([A])),
            "metrics": metric_record({"node-seconds": 0.5}),
            "more": ConfigRecord({"x": 1}),
        }
    )
    kind, lists, _, problem = read_reply(_reply(extra), 1, 3)
    assert kind == "invalid" and lists == [[]] and "more" in problem
    assert read_reply(_reply(good), 1, 2)[0] == "invalid", "more passages than asked"


def test_a_node_answers_a_batch_with_the_servers_vectors(small_shard_path, retriever, tmp_path):
    """The ClientApp handler on a batched message carrying query vectors; its reply passes the server's reader and
    holds what a direct search of the shard gives."""
    from fedrag_app.flower import client_app
    from fedrag_app.rag.knowledge_store import KnowledgeStore

    questions = ["who founded the red cross", "what is the capital of france", "when did world war 2 end"]
    vectors = retriever.encode_queries(questions).cpu().numpy()
    node = {
        "partition-id": 0,
        "num-partitions": 1,
        "data-path": str(tmp_path / "t.jsonl"),
        "store-path": small_shard_path,
        "federated-retrieval": True,
    }
    content = RecordDict(
        {
            "query": ConfigRecord(
                {
                    "questions": questions,
                    "vectors": vectors.ravel().tolist(),
                    "top-k": 3,
                    "embedding-model": retriever.name,
                }
            )
        }
    )
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    out = client_app.retrieve_passages(message(content, "query.retrieve"), ctx)
    kind, lists, seconds, problem = read_reply(_reply(out.content), 3, 3)
    assert kind == "ok" and problem is None and seconds > 0
    with KnowledgeStore.open(path=small_shard_path, embedding_model=retriever.name, dim=retriever.dim) as store:
        direct = store.search_batch(vectors, 3)
    assert [[h.id for h in q] for q in lists] == [[h.id for h in q] for q in direct]
    assert not out.content.array_records, "only passages leave the node"
    wrong = RecordDict(
        {
            "query": ConfigRecord(
                {
                    "questions": questions,
                    "vectors": vectors.ravel().tolist()[:-1],
                    "top-k": 3,
                    "embedding-model": retriever.name,
                }
            )
        }
    )
    with pytest.raises(ConfigError, match="do not split"):
        client_app.retrieve_passages(message(wrong, "query.retrieve"), ctx)
    other = RecordDict(
        {
            "query": ConfigRecord(
                {
                    "questions": questions,
                    "vectors": vectors.ravel().tolist(),
                    "top-k": 3,
                    "embedding-model": "another-encoder",
                }
            )
        }
    )
    with pytest.raises(Exception, match="another-encoder"):
        client_app.retrieve_passages(message(other, "query.retrieve"), ctx)
    trained = RecordDict(
        {
            "query": ConfigRecord(
                {
                    "questions": questions,
                    "vectors": vectors.ravel().tolist(),
                    "top-k": 3,
                    "embedding-model": retriever.name,
                    "context-fingerprint": "0" * 16,
                }
            )
        }
    )
    with pytest.raises(Exception, match="0000000000000000"):  # vectors meant for another context encoder's shard
        client_app.retrieve_passages(message(trained, "query.retrieve"), ctx)
    fine = RecordDict(
        {
            "query": ConfigRecord(
                {
                    "questions": questions,
                    "vectors": vectors.ravel().tolist(),
                    "top-k": 3,
                    "embedding-model": retriever.name,
                    "context-fingerprint": retriever.context_fingerprint(),
                }
            )
        }
    )
    assert client_app.retrieve_passages(message(fine, "query.retrieve"), ctx).content["docs"]["ids"]


def test_ask_federation_run_config_carries_any_question_and_the_answer_is_read_from_the_log(tmp_path):
    """The TOML file `ask --federation` hands to `flwr run --run-config` reads back (through Flower's own parser)
    to the same keys, whatever quotes or backslashes the question holds."""
    from flwr.common.config import parse_config_args

    from fedrag_app.federation.ask import answers_from_log, query_run_config

    question = """who's "the" \\ best? ünïcode\tand a tab"""
    path = tmp_path / "run.toml"
    path.write_text(
        query_run_config(question, {"partition.dir": "/p", "query.rrf-k": 10, "fed.resume": False, "dp.delta": 1e-5})
    )
    flat = parse_config_args([str(path)])
    assert flat == {
        "partition.dir": "/p",
        "query.rrf-k": 10,
        "fed.resume": False,
        "dp.delta": 1e-5,
        "fed.task": "query",
        "query.question": question,
    }
    AppConfig.from_flat(flat)
    log = (
        'INFO :      fedrag-answer {"question": "q", "answer": "Paris", "passages": []}\n'
        'INFO :      other line {"x": 1}\nINFO :      fedrag-query-metrics {"replies-ok": 2}\n'
    )
    assert answers_from_log(log) == ([{"question": "q", "answer": "Paris", "passages": []}], {"replies-ok": 2})


def test_a_node_bounds_what_a_query_run_may_take(small_shard_path, retriever, tmp_path, caplog):
    """node-config query-max-k (passages per question) and query-max-questions (questions per run, counted over the
    run's messages): a message over either gets an error reply naming the key, logged on the node, and the server
    counts it as limited; a new run starts counting afresh."""
    import logging

    from fedrag_app.federation.node_data import node_data
    from fedrag_app.flower import client_app

    questions = ["who founded the red cross", "what is the capital of france", "when did world war 2 end"]
    node = {
        "data-path": str(tmp_path / "t.jsonl"),
        "store-path": small_shard_path,
        "federated-retrieval": True,
        "query-max-questions": 5,
        "query-max-k": 3,
    }

    vectors = retriever.encode_queries(questions).cpu().numpy()

    def ask(ctx: Context, n: int, top_k: int) -> Message:
        query = {"questions": questions[:n], "vectors": vectors[:n].ravel().tolist(), "embedding-model": retriever.name}
        content = RecordDict({"query": ConfigRecord({**query, "top-k": top_k})})
        return client_app.retrieve_passages(message(content, "query.retrieve"), ctx)

    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    assert not ask(ctx, 3, 3).has_error(), "3 questions at k = 3: within both bounds"
    caplog.set_level(logging.WARNING)
    for n, top_k, named in [(1, 4, "query-max-k = 3"), (3, 2, "query-max-questions = 5")]:
        out = ask(ctx, n, top_k)
        assert out.has_error() and named in out.error.reason
        assert read_reply(_reply(out.error), n, top_k)[0] == "limited"
        assert any(named in r.getMessage() for r in caplog.records), "the node logs what it refused"
    assert not ask(ctx, 2, 3).has_error(), "5 questions in all: exactly the bound"
    assert ask(ctx, 1, 1).has_error(), "the run's 6th question"
    fresh = Context(run_id=2, node_id=7, node_config=node, state=RecordDict(), run_config={})
    assert not ask(fresh, 3, 3).has_error(), "another run counts from 0"
    defaults = node_data(AppConfig(), {k: v for k, v in node.items() if not k.startswith("query-")})
    assert (defaults.query_max_questions, defaults.query_max_k) == (1000, 20)
    for key, value in [("query-max-k", 0), ("query-max-k", 101), ("query-max-questions", 0)]:
        with pytest.raises(ConfigError, match=f"'{key}' = {value}"):
            node_data(AppConfig(), {**node, key: value})


def test_answers_are_scored_by_the_evaluation_metrics_over_the_questions_with_gold_answers():
    """EM/F1 and answer recall/MRR of the merged lists, by hand; a question without gold answers is not scored."""
    examples = [QAExample("1", "q", ("Paris",), ""), QAExample("2", "q", ("Rome",), ""), QAExample("3", "q", (), "")]
    merged = [
        [MergedHit("x", "X", "none", 0.9), MergedHit("a", "France", "Paris is the capital", 0.8)],
        [MergedHit("c", "Rome", "a city", 0.9)],
        [MergedHit("d", "Paris", "Rome", 0.9)],
    ]
    scores = score_answers(examples, ["paris", "the city of Milan", "anything"], merged, recall_k=2)
    assert scores == {
        "wq-em": 0.5,
        "wq-f1": 0.5,
        "retrieval-recall@2": 1.0,
        "retrieval-mrr@2": pytest.approx(0.75),
        "scored-n": 2.0,
    }
    assert score_answers(examples, ["paris", "x", "y"], merged, recall_k=1)["retrieval-recall@1"] == 0.5
    assert score_answers(examples[2:], ["anything"], merged[2:], recall_k=2) == {"scored-n": 0.0}
