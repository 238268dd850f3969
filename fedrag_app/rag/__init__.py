"""The RAG system itself: generator, dual-encoder retriever, Qdrant knowledge store, embedding cache, ingestion,
prompts, retrieval and the answering pipeline. No training, no federation."""
