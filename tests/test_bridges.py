"""The bridges (fedrag_app/bridges/) with the real libraries and the real models, no mocks: LlamaIndex and LangChain
retrievers give the passages of the product's own retrieval in its order, their query engine / chain the same greedy
answer as `ask`'s pipeline; an MCP client (the SDK's own, over stdio against `fedrag-app mcp` and over streamable HTTP
at `fedrag-app serve`'s /mcp) lists the tools and gets the same top-k; the official openai client gets the answer from
`fedrag-app serve`, 16 concurrent requests get their own answers, and bad input gets an error that says why.

Kept cheap (a generation's cost is mostly its prompt): answers of 6 tokens from one passage, closed-book questions where
only the answer matters, one thread and one `serve` and one `mcp` process for the module."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import pytest

from fedrag_app.bridges.service import MAX_TOP_K, BadRequest, RagService
from fedrag_app.core.errors import StoreError
from fedrag_app.rag.knowledge_store import KnowledgeStore
from fedrag_app.rag.pipeline import RagPipeline

QUESTIONS = ["who was the first president of the united states", "what is the capital of france"]
CLOSED_BOOK = [
    "what is the capital of france",
    "who wrote hamlet",
    "what is the largest planet",
    "how many legs has a spider",
]
TOKENS = 6  # generator.max-new-tokens everywhere here: a short answer is enough to compare
SHORT = 3  # closed-book answers: each new token costs as much as the short prompt
TOP_K = 1  # eval.top-k of every server here: one passage in the prompt
K = 5  # passages for the retrieval comparisons
CHEAP = ["--top-k", str(TOP_K), "--set", f"generator.max-new-tokens={TOKENS}", "--set", "runtime.num-threads=1"]
FEDRAG_APP = str(Path(sys.executable).with_name("fedrag-app"))


@pytest.fixture(scope="module")
def service(generator, retriever, small_shard_path):
    store = KnowledgeStore.open(path=small_shard_path, embedding_model=retriever.name, dim=retriever.dim)
    svc = RagService(RagPipeline(generator, retriever, store, top_k=TOP_K), max_new_tokens=TOKENS)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def reference(service):
    """What `fedrag-app ask --json` computes, question by question: its pipeline's top-K and greedy answer (and, for
    the closed-book questions, `ask --top-k 0`'s answer)."""
    pipe = service.pipeline
    ref = {q: {"top": pipe.retrieve([q], K)[0]} for q in QUESTIONS}
    ref[QUESTIONS[0]]["answer"] = pipe.answer([QUESTIONS[0]], max_new_tokens=TOKENS)[0]
    ref["closed"] = {q: pipe.answer([q], max_new_tokens=SHORT, top_k=0)[0].answer for q in CLOSED_BOOK}
    assert len(set(ref["closed"].values())) == len(CLOSED_BOOK)  # distinct, so a mixed-up reply would show
    return ref


def _ids(hits) -> list[str]:
    return [h.id for h in hits]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llamaindex_retriever_and_query_engine_match_ask(service, reference):
    from fedrag_app.bridges.llamaindex import FedragRetriever, query_engine

    q = QUESTIONS[0]
    nodes = FedragRetriever(service, top_k=K).retrieve(q)
    ref = reference[q]["top"]
    assert [n.node.node_id for n in nodes] == _ids(ref)
    assert [n.score for n in nodes] == pytest.approx([h.score for h in ref])
    assert [(n.node.metadata["title"], n.node.text) for n in nodes] == [(h.title, h.text) for h in ref]

    response = query_engine(service).query(q)
    answer = reference[q]["answer"]
    assert str(response) == answer.answer and answer.answer
    assert [n.node.node_id for n in response.source_nodes] == _ids(answer.hits)


def test_langchain_retriever_and_chain_match_ask(service, reference):
    from fedrag_app.bridges.langchain import FedragRetriever, rag_chain

    q = QUESTIONS[0]
    docs = FedragRetriever(service=service, k=K).invoke(q)
    ref = reference[q]["top"]
    assert [d.id for d in docs] == _ids(ref)
    assert [(d.metadata["title"], d.page_content) for d in docs] == [(h.title, h.text) for h in ref]
    assert [d.metadata["score"] for d in docs] == pytest.approx([h.score for h in ref])

    out = rag_chain(service).invoke(q)
    assert out["answer"] == reference[q]["answer"].answer
    assert [d.id for d in out["context"]] == _ids(reference[q]["answer"].hits)


def test_documents_from_either_library_become_a_searchable_shard(tmp_path, retriever):
    from langchain_core.documents import Document as LcDocument
    from llama_index.core import Document as LiDocument

    from fedrag_app.bridges.langchain import index_documents
    from fedrag_app.bridges.llamaindex import index_nodes

    facts = {
        "tides": ("Tides", "Tides are caused mainly by the gravitational pull of the Moon."),
        "basalt": ("Basalt", "Basalt is a volcanic rock formed from cooled lava."),
        "violin": ("Violin", "The violin is a string instrument played with a bow."),
    }
    li_nodes = [LiDocument(id_=i, text=text, metadata={"title": title}) for i, (title, text) in facts.items()]
    lc_docs = [LcDocument(id=i, page_content=text, metadata={"title": title}) for i, (title, text) in facts.items()]
    for name, build, docs in (("li", index_nodes, li_nodes), ("lc", index_documents, lc_docs)):
        stats = build(docs, retriever, path=str(tmp_path / name))
        assert stats.passages == 3
        with KnowledgeStore.open(path=str(tmp_path / name), embedding_model=retriever.name, dim=retriever.dim) as kb:
            assert kb.count() == 3
            top = kb.search(retriever.encode_queries(["what causes tides"]).cpu().numpy()[0], 1)[0]
            assert (top.id, top.title, top.text) == ("tides", *facts["tides"])


def test_the_service_refuses_bad_input_by_name(service):
    for call, field in (
        (lambda: service.search("", 2), "query"),
        (lambda: service.search("  ", 2), "query"),
        (lambda: service.search("x", 0), "k"),
        (lambda: service.search("x", MAX_TOP_K + 1), "k"),
        (lambda: service.search("x", "3"), "k"),
        (lambda: service.answer(None), "question"),
        (lambda: service.answer("x", top_k=-1), "top_k"),
        (lambda: service.answer("x", max_new_tokens=0), "max_tokens"),
        (lambda: service.answer("x" * 5000), "question"),
    ):
        with pytest.raises(BadRequest, match=f"'{field}'"):
            call()


# --- MCP ---


async def _mcp_session_checks(client, reference) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"search", "ask"}
    assert {"query", "k"} <= set(tools["search"].input_schema["properties"])
    q = QUESTIONS[0]
    found = await client.call_tool("search", {"query": q, "k": K})
    assert not found.is_error, found.content
    passages = found.structured_content["passages"]
    assert [p["id"] for p in passages] == _ids(reference[q]["top"])
    assert [p["rank"] for p in passages] == list(range(1, K + 1))
    assert {"id", "title", "score", "text"} <= set(passages[0])
    for name, args, says in (
        ("search", {"query": q, "k": 0}, "'k'"),
        ("search", {"query": q, "k": 10**6}, "'k'"),
        ("search", {"query": ""}, "'query'"),
        ("search", {"query": q, "k": "many"}, "k"),
        ("ask", {"question": "   "}, "'question'"),
        ("no_such_tool", {}, "no_such_tool"),
    ):
        bad = await client.call_tool(name, args)
        assert bad.is_error and says in bad.content[0].text, (name, args, bad.content)


def test_the_federated_service_refuses_bad_input_by_name_before_any_run():
    """`fedrag-app mcp --federation`'s checks are the local service's, made before a query run is launched (the
    connection here does not exist: reaching it would be a FederatedRunFailed, not a BadRequest)."""
    from fedrag_app.bridges.federated import FederatedService
    from fedrag_app.bridges.service import BadRequest

    service = FederatedService("no-such-connection")
    for call, field in (
        (lambda: service.search("", 2), "'query'"),
        (lambda: service.search("x", 0), "'k'"),
        (lambda: service.search("x", MAX_TOP_K + 1), "'k'"),
        (lambda: service.answer("  "), "'question'"),
        (lambda: service.answer("x", top_k=-1), "'top_k'"),
        (lambda: service.answer("x", max_new_tokens=0), "'max_tokens'"),
    ):
        with pytest.raises(BadRequest, match=field):
            call()


def test_mcp_over_stdio_serves_search_and_ask(tmp_path, small_shard_path, reference):
    """`fedrag-app mcp` started by the SDK's own stdio client, as an MCP host would start it."""
    from mcp import Client, StdioServerParameters

    shard = shutil.copytree(small_shard_path, tmp_path / "shard")  # a shard is open in one process at a time
    params = StdioServerParameters(
        command=FEDRAG_APP,
        args=["mcp", "--store", str(shard), *CHEAP],
        env=dict(os.environ),
    )

    async def session() -> None:
        with anyio.fail_after(300):
            await checks()

    async def checks() -> None:
        async with Client(params, read_timeout_seconds=300) as client:
            await _mcp_session_checks(client, reference)
            q = CLOSED_BOOK[1]
            asked = await client.call_tool("ask", {"question": q, "k": 0, "max_tokens": SHORT})
            assert not asked.is_error, asked.content
            assert asked.structured_content == {"answer": reference["closed"][q], "sources": []}

    anyio.run(session)


# --- OpenAI-compatible HTTP (`fedrag-app serve`) ---


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_shard_path):
    """One `fedrag-app serve` process for the module, on its own copy of the shard."""
    folder = tmp_path_factory.mktemp("serve")
    shard = shutil.copytree(small_shard_path, folder / "shard")
    port = free_port()
    log = open(folder / "serve.log", "w")
    argv = [FEDRAG_APP, "serve", "--port", str(port), "--store", str(shard)]
    proc = subprocess.Popen(argv + CHEAP, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (folder / "serve.log").read_text()
            assert time.monotonic() < deadline, "serve did not answer /health in 300 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_mcp_over_streamable_http_from_serve_gives_the_same_top_k(served, reference):
    """`fedrag-app serve` also speaks MCP at /mcp: the SDK's own streamable HTTP client."""
    from mcp import Client

    async def session() -> None:
        with anyio.fail_after(120):
            async with Client(f"{served}/mcp", read_timeout_seconds=120) as client:
                await _mcp_session_checks(client, reference)

    anyio.run(session)


def test_an_mcp_knowledge_source_retrieves_what_the_local_store_does(served, service):
    """store.mcp-url = this product's own MCP server (serve's /mcp, a copy of the same shard): evaluate's retrieval
    through it gives the local store's passages, hence its recall@10 and MRR (and, the prompts being the same, its
    answers and F1)."""
    from fedrag_app.config.app_config import AppConfig
    from fedrag_app.data.loaders import load_web_questions
    from fedrag_app.evaluation.evaluate import evaluate_retrieval
    from fedrag_app.rag.pipeline import open_store
    from fedrag_app.rag.retrieval import retrieve

    cfg = AppConfig.from_flat({"store.mcp-url": f"{served}/mcp"})
    wq = load_web_questions("test", cfg.data, 20)
    questions, pipe = [e.question for e in wq], service.pipeline
    local = retrieve(pipe.retriever, pipe.store, questions, 10)
    with open_store(cfg, pipe.retriever) as source:
        remote = retrieve(pipe.retriever, source, questions, 10)
        with pytest.raises(StoreError, match="training needs a local store"):
            retrieve(pipe.retriever, source, questions[:1], 2, with_vectors=True)
    assert [[(h.id, h.title, h.text) for h in hs] for hs in remote] == [
        [(h.id, h.title, h.text) for h in hs] for hs in local
    ]
    assert [h.score for hs in remote for h in hs] == pytest.approx([h.score for hs in local for h in hs], abs=1e-5)
    assert evaluate_retrieval(remote, wq, 10) == evaluate_retrieval(local, wq, 10)

    with pytest.raises(StoreError, match="has no tool 'lookup'.*store.mcp-tool"):
        open_store(AppConfig.from_flat({"store.mcp-url": f"{served}/mcp", "store.mcp-tool": "lookup"}), pipe.retriever)
    down = f"http://127.0.0.1:{free_port()}/mcp"
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach the MCP server at {down}"):
        open_store(AppConfig.from_flat({"store.mcp-url": down}), pipe.retriever)
    assert time.monotonic() - started < 30


def test_the_openai_client_gets_the_answer_and_its_passages(served, reference):
    from openai import BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["fedrag"]
    q = QUESTIONS[0]
    reply = client.chat.completions.create(model="fedrag", messages=[{"role": "user", "content": q}])
    assert reply.choices[0].message.content == reference[q]["answer"].answer
    assert reply.choices[0].finish_reason == "stop"
    passages = reply.model_extra["passages"]
    assert [p["id"] for p in passages] == _ids(reference[q]["answer"].hits)

    closed = CLOSED_BOOK[0]
    stream = client.chat.completions.create(
        model="fedrag",
        messages=[{"role": "user", "content": closed}],
        stream=True,
        max_tokens=SHORT,
        extra_body={"top_k": 0},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reference["closed"][closed]

    with pytest.raises(BadRequestError, match="'top_k'"):
        client.chat.completions.create(
            model="fedrag", messages=[{"role": "user", "content": q}], extra_body={"top_k": MAX_TOP_K + 1}
        )
    with pytest.raises(NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": q}])


def test_sixteen_concurrent_requests_get_their_own_answers(served, reference):
    """Closed book (top_k 0: a short prompt, the cheapest generation), four questions with distinct answers."""

    def ask(i: int) -> tuple[str, dict]:
        q = CLOSED_BOOK[i % len(CLOSED_BOOK)]
        body = {"model": "fedrag", "messages": [{"role": "user", "content": q}], "top_k": 0, "max_tokens": SHORT}
        r = httpx.post(f"{served}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return q, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16)))
    assert len(results) == 16
    for q, reply in results:
        assert reply["choices"][0]["message"]["content"] == reference["closed"][q]
        assert reply["passages"] == []


def test_bad_http_requests_get_an_openai_style_error_not_a_traceback(served):
    post = lambda **kw: httpx.post(f"{served}/v1/chat/completions", timeout=60, **kw)  # noqa: E731
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    for response, says in (
        (post(content=b"{not json", headers={"content-type": "application/json"}), "not valid JSON"),
        (post(json={"model": "fedrag"}), "messages"),
        (post(json={"messages": []}), "user message"),
        (post(json={"messages": user("")}), "'question'"),
        (post(json={"messages": user("x"), "top_k": -1}), "'top_k'"),
        (post(json={"messages": user("x"), "max_tokens": 10**6}), "'max_tokens'"),
        (post(json=[1, 2]), "invalid request"),
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert says in error["message"] and "Traceback" not in response.text, error
    assert httpx.get(f"{served}/no/such/route").json()["error"]["code"] == 404
    assert httpx.get(f"{served}/health").json()["status"] == "ok"
    json.dumps(httpx.get(f"{served}/v1/models").json())  # plain JSON


def _readme_section() -> str:
    return (Path(__file__).resolve().parents[1] / "docs" / "BRIDGES.md").read_text()


def test_the_readme_python_snippet_runs_as_written(
    tmp_path, monkeypatch, capsys, generator, retriever, small_shard_path, reference
):
    """docs/BRIDGES.md's LlamaIndex + LangChain block, executed as written (but for two keys that make its answers
    cheap) in a folder holding what it names: a shard and a `train` output (the session's fresh adapter and retriever,
    saved). Its
    retrievers give `ask`'s top-5, its engine and chain `ask`'s answer, its ingestion two searchable shards."""
    import re

    from fedrag_app.rag.generator import save_adapter

    block = re.findall(r"```python\n(.*?)```", _readme_section(), re.S)[0]
    cheap = f'{{"generator.max-new-tokens": {TOKENS}, "eval.top-k": {TOP_K}, '  # the one edit: a cheaper answer
    block = block.replace("AppConfig.from_flat({", "AppConfig.from_flat(" + cheap, 1)
    assert cheap in block
    shutil.copytree(small_shard_path, tmp_path / "my-shard")
    save_adapter(generator, tmp_path / "outputs" / "train" / "adapter")
    retriever.save(tmp_path / "outputs" / "train" / "retriever")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "docs/BRIDGES.md", "exec"), scope)
    service = scope["service"]
    try:
        q = scope["q"]
        assert q == QUESTIONS[0] and (service.top_k, service.max_new_tokens) == (TOP_K, TOKENS)
        top, answer = reference[q]["top"], reference[q]["answer"]  # `ask`'s pipeline: same shard, models, keys
        assert [n.node.node_id for n in scope["nodes"]] == [d.id for d in scope["docs"]] == _ids(top)
        assert capsys.readouterr().out == f"{answer.answer}\n{answer.answer}\n"  # the engine's, then the chain's
        for shard, doc_id in (("li-shard", "tides"), ("lc-shard", "basalt")):
            with KnowledgeStore.open(path=shard, embedding_model=retriever.name, dim=retriever.dim) as kb:
                assert [h.id for h in kb.search(retriever.encode_queries([doc_id]).cpu().numpy()[0], 1)] == [doc_id]
    finally:
        service.close()


def test_the_readme_client_snippets_import_what_exists_and_name_real_commands():
    """The MCP and OpenAI blocks need a running server (the tests above make the same calls against one): here they
    compile and their imports resolve, and every `fedrag-app <command>` in the section exists."""
    import ast
    import re

    section = _readme_section()
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    for block in blocks[1:]:
        tree = compile(block, "docs/BRIDGES.md", "exec", ast.PyCF_ONLY_AST)
        imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        exec(compile(ast.Module(body=imports, type_ignores=[]), "docs/BRIDGES.md", "exec"), {})
    from fedrag_app.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {"serve", "mcp"} <= set(re.findall(r"`fedrag-app (\w+)", section)) <= commands
