"""HTTP bridge: the fine-tuned RAG system behind an OpenAI-compatible API (`fedrag-app serve`), so any OpenAI client,
SDK or UI can use it by changing its base URL.

- `POST /v1/chat/completions`: the last user message is the question; the reply is a standard chat completion whose
  message is the answer, plus a top-level `passages` field (the passages used, as `ask --json` lists them: rank, id,
  score, title, text). Extra request keys: `top_k` (passages, 0 = closed book); `max_tokens` /
  `max_completion_tokens` cap the answer; `stream: true` sends the answer as one chunk of server-sent events.
  Sampling keys (temperature, top_p, ...) are accepted and ignored: answers are greedy, as `ask`'s.
- `GET /v1/models`, `GET /health`.
- `/mcp`: the same system as an MCP server over streamable HTTP (tools `search` and `ask`, `bridges/mcp_server.py`), so
  one process, holding the shard (open in one process at a time) and the models once, serves both kinds of client.

Models are loaded once (the `RagService` given); handlers are plain functions that FastAPI runs in its thread pool
behind the service's lock, so concurrent requests queue instead of interleaving, and `/health` answers meanwhile.
Every refusal is an OpenAI-style error body (`{"error": {"message", "type", "param", "code"}}`), never a traceback.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedrag_app.bridges.mcp_server import build_mcp_server
from fedrag_app.bridges.service import BadRequest, RagService, passage_dict
from fedrag_app.core.errors import FedRagAppError


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send keys this server has no use for
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    top_k: int | None = None
    stream: bool = False


def _error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None, code=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _text(content: str | list[dict] | None) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
    return content or ""


def question_of(request: ChatRequest) -> str:
    """The last user message: single-turn RAG, as `ask` (earlier turns are not part of the retrieval query)."""
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise BadRequest("'messages' must contain a user message (the question)")
    return _text(users[-1].content)


def build_app(service: RagService, *, host: str = "127.0.0.1") -> FastAPI:
    """The FastAPI app over an already loaded service (``host``: where it listens, for MCP's DNS-rebinding check)."""
    mcp = build_mcp_server(service, service.name)
    mcp_routes = mcp.streamable_http_app(host=host).routes  # creates the session manager the lifespan runs

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        async with mcp.session_manager.run():
            yield

    app = FastAPI(title="fedrag-app", description=__doc__, version="1", lifespan=lifespan)
    app.router.routes.extend(mcp_routes)
    started = int(time.time())

    @app.exception_handler(BadRequest)
    def _bad_request(_: Request, e: BadRequest):
        return _error(400, str(e))

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            if err.get("type") == "json_invalid":
                return _error(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg')}")
        return _error(400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(FedRagAppError)
    def _unavailable(_: Request, e: FedRagAppError):  # e.g. the MCP knowledge source behind store.mcp-url went down
        return _error(503, str(e), kind="server_error")

    @app.exception_handler(StarletteHTTPException)
    def _http(_: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), code=e.status_code)

    @app.exception_handler(Exception)
    def _crash(_: Request, e: Exception):
        return _error(500, f"internal error ({type(e).__name__}); see the server's log", kind="server_error")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": service.name, "top_k": service.top_k}

    @app.get("/v1/models")
    def models() -> dict:
        card = {"id": service.name, "object": "model", "created": started, "owned_by": "fedrag-app"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        if request.model not in (None, "", service.name):
            return _error(404, f"model {request.model!r} is not served here; use {service.name!r}", param="model",
                          code="model_not_found")  # fmt: skip
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        result = service.answer(question_of(request), top_k=request.top_k, max_new_tokens=max_tokens)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.name}
        passages = [passage_dict(h, i) for i, h in enumerate(result.hits, 1)]
        if request.stream:
            return StreamingResponse(_stream(head, result.answer, passages), media_type="text/event-stream")
        message = {"role": "assistant", "content": result.answer}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        return {**head, "object": "chat.completion", "choices": [choice], "passages": passages}

    return app


def _stream(head: dict, answer: str, passages: list[dict]):
    """The answer as chat.completion.chunk events: the text (with the passages), then the stop, then [DONE]."""
    chunk = {**head, "object": "chat.completion.chunk"}
    first = {"index": 0, "delta": {"role": "assistant", "content": answer}, "finish_reason": None}
    yield f"data: {json.dumps({**chunk, 'choices': [first], 'passages': passages})}\n\n"
    yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
    yield "data: [DONE]\n\n"
