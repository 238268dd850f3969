"""MCP bridge: an institution's shard (and its fine-tuned system) as an MCP server, for any MCP client (assistants,
IDEs, agents), over stdio or streamable HTTP (`fedrag-app mcp`).

Two tools, both thin calls of `RagService`: `search` (query, k -> passages with ids, titles, scores, as `ask --json`
lists them) and `ask` (question -> answer + its sources). A refused request is a tool error that says why; the SDK
answers an unknown tool or ill-typed arguments the same way.
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from fedrag_app.bridges.service import MAX_NEW_TOKENS, MAX_TOP_K, RagService, passage_dict
from fedrag_app.core.errors import FedRagAppError

INSTRUCTIONS = (
    "Retrieval over a private Wikipedia-style passage store, and answers from a RAG system fine-tuned on it. "
    "`search` returns the passages nearest a query; `ask` answers a question from the passages it retrieves."
)


class PassageOut(BaseModel):
    rank: int
    id: str
    score: float = Field(description="cosine similarity of the query and the passage")
    title: str
    text: str


class SearchResult(BaseModel):
    passages: list[PassageOut]


class AskResult(BaseModel):
    answer: str
    sources: list[PassageOut] = Field(description="the passages the answer was generated from, best first")


def _passages(hits) -> list[PassageOut]:
    return [PassageOut(**passage_dict(h, i)) for i, h in enumerate(hits, 1)]


def build_mcp_server(service: RagService, name: str = "fedrag") -> MCPServer:
    """An MCP server whose tools call `service` (loaded once; the SDK runs each call in a worker thread)."""
    server = MCPServer(name, instructions=INSTRUCTIONS, log_level="WARNING")
    default_k = service.top_k or 5

    @server.tool(description=f"The k passages (1 to {MAX_TOP_K}) nearest the query: ids, titles, cosine scores, texts.")
    def search(query: str, k: int = default_k) -> SearchResult:
        try:
            return SearchResult(passages=_passages(service.search(query, k)))
        except FedRagAppError as e:  # a bad request, or a knowledge source that failed: the message says which
            raise ToolError(str(e)) from e

    @server.tool(
        description=f"Answer a question from the k passages (0 to {MAX_TOP_K}) retrieved for it, in at most max_tokens "
        f"tokens (1 to {MAX_NEW_TOKENS}); the answer's sources come with it."
    )
    def ask(question: str, k: int | None = None, max_tokens: int | None = None) -> AskResult:
        try:
            result = service.answer(question, top_k=k, max_new_tokens=max_tokens)
        except FedRagAppError as e:  # a bad request, or a knowledge source that failed: the message says which
            raise ToolError(str(e)) from e
        return AskResult(answer=result.answer, sources=_passages(result.hits))

    return server
