"""LangChain bridge: the fine-tuned system as a LangChain retriever, LLM and runnable RAG chain, and LangChain
`Document`s as a shard, so a LangChain application swaps its parts for this product's.

Nothing is re-implemented: retrieval is `RagService.search`, generation `RagService.complete`, the chain's prompt the
product's one template (`rag/prompts.py`), and ingestion `rag/ingest.build_shard`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models.llms import LLM
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough
from pydantic import ConfigDict

from fedrag_app.bridges.service import RagService
from fedrag_app.data.loaders import Passage
from fedrag_app.rag.ingest import IndexStats, build_shard
from fedrag_app.rag.knowledge_store import Hit
from fedrag_app.rag.retriever import DualEncoder


def hit_to_document(hit: Hit) -> Document:
    """A store hit as a LangChain Document: passage id as id, title and cosine score in metadata."""
    return Document(id=hit.id, page_content=hit.text, metadata={"title": hit.title, "score": hit.score})


def document_to_hit(doc: Document) -> Hit:
    meta = doc.metadata or {}
    return Hit(
        id=str(doc.id or ""),
        score=float(meta.get("score", 0.0)),
        title=str(meta.get("title", "")),
        text=doc.page_content,
    )


class FedragRetriever(BaseRetriever):
    """The product's retrieval (query encoder, possibly fine-tuned, + Qdrant store): same passages, same order."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    service: RagService
    k: int | None = None  # None: the service's eval.top-k

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [hit_to_document(h) for h in self.service.search(query, self.k)]


class FedragLLM(LLM):
    """The generator with its adapter, greedy, on a prompt used exactly as given (the chain gives it the product's
    template; `service.chat_prompt` formats a conversation); `stop` strings cut the answer."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    service: RagService
    max_new_tokens: int | None = None  # None: the service's generator.max-new-tokens

    @property
    def _llm_type(self) -> str:
        return "fedrag"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.service.name, "max_new_tokens": self.max_new_tokens}

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        text = self.service.complete(prompt, max_new_tokens=kwargs.get("max_new_tokens", self.max_new_tokens))
        for s in stop or []:
            text = text.split(s)[0]
        return text


def rag_chain(service: RagService, k: int | None = None) -> Runnable:
    """question -> {"question", "context" (Documents), "answer"}: this product's retriever, template and generator as
    one runnable, the same greedy answer as `fedrag-app ask`."""
    retriever, llm = FedragRetriever(service=service, k=k), FedragLLM(service=service)

    def prompt(inputs: dict) -> str:
        question = service.check_question(inputs["question"])
        return service.prompt(question, [document_to_hit(d) for d in inputs["context"]])

    return RunnableParallel(question=RunnablePassthrough(), context=retriever).assign(
        answer=RunnableLambda(prompt) | llm
    )


def _document_id(doc: Document) -> str:
    """The Document's id, else metadata "id", else a hash of its text (stable, so re-indexing does not duplicate)."""
    given = doc.id or (doc.metadata or {}).get("id")
    return str(given) if given else hashlib.sha256(doc.page_content.encode()).hexdigest()[:16]


def index_documents(
    documents: Sequence[Document],
    retriever: DualEncoder,
    **where: Any,
) -> IndexStats:
    """LangChain `Document`s (any loader's or splitter's output) into a shard that `ask`, `serve` and training use.
    ``where``: `build_shard`'s path / url / replace / progress."""
    passages = [
        Passage(id=_document_id(d), title=str((d.metadata or {}).get("title", "")), text=d.page_content)
        for d in documents
    ]
    return build_shard(passages, retriever, **{"progress": False, **where})  # a library call: no bar unless asked
