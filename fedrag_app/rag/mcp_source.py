"""A knowledge source behind someone else's MCP server (`store.mcp-url`): retrieval calls its search tool with each
question instead of searching a local shard, so `ask`, `serve` and `evaluate` can run the (fine-tuned) generator on
knowledge an MCP provider holds. The server encodes the questions itself: vectors never travel, so training, which
needs them, keeps to local stores.

This product's own MCP server (`fedrag-app mcp`, `serve`'s /mcp) returns the passages as structured content
(`{"passages": [{id, title, score, text}, ...]}`), and retrieval through it equals the local store's; another
server's text blocks are taken as passages one each, in order.
"""

from __future__ import annotations

from fedrag_app.core.errors import StoreError
from fedrag_app.rag.knowledge_store import Hit


class McpKnowledgeSource:
    """One MCP client session, held open in a background event loop and called from synchronous code."""

    searches_text = True  # rag/retrieval.py sends this source questions, not vectors

    def __init__(self, url: str, tool: str = "search", *, timeout_s: float = 60.0):
        from anyio.from_thread import start_blocking_portal
        from mcp import Client

        self.url, self.tool, self.embedding_model = url, tool, f"mcp:{url}"
        self._portal_cm = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._client_cm = self._portal.wrap_async_context_manager(Client(url, read_timeout_seconds=timeout_s))
        try:
            self._client = self._client_cm.__enter__()
            tools = [t.name for t in self._portal.call(self._client.list_tools).tools]
        except Exception as e:  # an unreachable server surfaces as an ExceptionGroup from the SDK's task group
            self._portal_cm.__exit__(None, None, None)
            raise StoreError(f"cannot reach the MCP server at {url} (store.mcp-url): {_reason(e)}") from None
        if tool not in tools:
            self.close()
            raise StoreError(f"the MCP server at {url} has no tool {tool!r} (it has {tools}): set store.mcp-tool")

    def search_texts(self, queries: list[str], top_k: int) -> list[list[Hit]]:
        return [self._search(q, top_k) for q in queries]

    def _search(self, query: str, top_k: int) -> list[Hit]:
        try:
            result = self._portal.call(self._client.call_tool, self.tool, {"query": query, "k": top_k})
        except Exception as e:
            raise StoreError(f"the MCP server at {self.url} failed: {_reason(e)}") from None
        texts = [c.text for c in result.content if getattr(c, "type", "") == "text"]
        if result.is_error:
            raise StoreError(f"the MCP server at {self.url} refused {self.tool}: {' '.join(texts)}")
        passages = (result.structured_content or {}).get("passages")
        if passages is None:
            return [Hit(id=str(i), score=0.0, title="", text=t) for i, t in enumerate(texts[:top_k], 1)]
        return [
            Hit(id=str(p["id"]), score=float(p.get("score", 0.0)), title=str(p.get("title", "")), text=str(p["text"]))
            for p in passages[:top_k]
        ]

    def close(self) -> None:
        try:
            self._client_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> McpKnowledgeSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(e: BaseException) -> str:
    """The innermost cause of an SDK failure (connection refused, timeout), not the task-group wrapper."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}"
