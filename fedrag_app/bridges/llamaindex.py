"""LlamaIndex bridge: the fine-tuned system as a LlamaIndex retriever, LLM and query engine, and LlamaIndex
documents/nodes as a shard, so an application already built on LlamaIndex swaps its parts for this product's.

Nothing is re-implemented: retrieval is `RagService.search`, generation `RagService.complete`, the query engine's prompt
the product's one template (`rag/prompts.py`), and ingestion `rag/ingest.build_shard`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.response.schema import Response
from llama_index.core.llms import (
    ChatMessage,
    CompletionResponse,
    CompletionResponseGen,
    CustomLLM,
    LLMMetadata,
)
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle, TextNode
from pydantic import PrivateAttr

from fedrag_app.bridges.service import RagService
from fedrag_app.data.loaders import Passage
from fedrag_app.rag.ingest import IndexStats, build_shard
from fedrag_app.rag.knowledge_store import Hit
from fedrag_app.rag.retriever import DualEncoder


def hit_to_node(hit: Hit) -> NodeWithScore:
    """A store hit as LlamaIndex sees one: the passage id as node id, its title in metadata, the cosine score."""
    return NodeWithScore(node=TextNode(id_=hit.id, text=hit.text, metadata={"title": hit.title}), score=hit.score)


def node_to_hit(node: NodeWithScore) -> Hit:
    return Hit(
        id=node.node.node_id,
        score=float(node.score or 0.0),
        title=str(node.node.metadata.get("title", "")),
        text=node.node.get_content(metadata_mode=MetadataMode.NONE),
    )


class FedragRetriever(BaseRetriever):
    """The product's retrieval (query encoder, possibly fine-tuned, + Qdrant store): same passages, same order."""

    def __init__(self, service: RagService, top_k: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.service, self.top_k = service, top_k

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [hit_to_node(h) for h in self.service.search(query_bundle.query_str, self.top_k)]


class FedragLLM(CustomLLM):
    """The generator with its adapter, greedy. A prompt marked ``formatted`` is used as given; a plain one, and chat
    messages, go through the generator's own chat template."""

    _service: RagService = PrivateAttr()

    def __init__(self, service: RagService, **kwargs: Any):
        super().__init__(
            messages_to_prompt=lambda messages: service.chat_prompt([_chat_dict(m) for m in messages]),
            completion_to_prompt=lambda text: service.chat_prompt([{"role": "user", "content": text}]),
            **kwargs,
        )
        self._service = service

    @property
    def metadata(self) -> LLMMetadata:
        tok = self._service.tokenizer
        window = tok.model_max_length if tok.model_max_length < 10**9 else 8192
        return LLMMetadata(
            context_window=window, num_output=self._service.max_new_tokens, model_name=self._service.name
        )

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text = prompt if formatted else self.completion_to_prompt(prompt)
        return CompletionResponse(text=self._service.complete(text, max_new_tokens=kwargs.get("max_new_tokens")))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        response = self.complete(prompt, formatted=formatted, **kwargs)  # greedy and whole: one chunk
        yield CompletionResponse(text=response.text, delta=response.text)


def _chat_dict(message: ChatMessage) -> dict:
    return {"role": message.role.value, "content": message.content or ""}


class FedragQueryEngine(CustomQueryEngine):
    """Retrieve with `retriever`, prompt with the product's template, answer with `llm`: `fedrag-app ask` in one call
    (either part may be swapped for another LlamaIndex retriever or LLM)."""

    retriever: BaseRetriever
    llm: CustomLLM
    service: RagService

    def custom_query(self, query_str: str) -> Response:
        nodes = self.retriever.retrieve(query_str)
        prompt = self.service.prompt(self.service.check_question(query_str), [node_to_hit(n) for n in nodes])
        return Response(response=self.llm.complete(prompt, formatted=True).text, source_nodes=nodes)


def query_engine(service: RagService, top_k: int | None = None) -> FedragQueryEngine:
    """The one-call query engine over this product's retriever, store, generator and template."""
    return FedragQueryEngine(retriever=FedragRetriever(service, top_k), llm=FedragLLM(service), service=service)


def index_nodes(
    nodes: Sequence[BaseNode],
    retriever: DualEncoder,
    **where: Any,
) -> IndexStats:
    """LlamaIndex `Document`s or nodes (any reader's output) into a shard that `ask`, `serve` and training use: node id
    as passage id, metadata "title" as title, the node's text (without metadata) as passage.
    ``where``: `build_shard`'s path / url / replace / progress."""
    passages = [
        Passage(id=n.node_id, title=str(n.metadata.get("title", "")), text=n.get_content(MetadataMode.NONE))
        for n in nodes
    ]
    return build_shard(passages, retriever, **{"progress": False, **where})  # a library call: no bar unless asked
