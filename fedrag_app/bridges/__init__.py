"""The fine-tuned RAG system in the tools people already use: LlamaIndex, LangChain, MCP, OpenAI-compatible HTTP.

Each module is a thin view of one `service.RagService` (the product's own retriever, store, generator and template)."""
