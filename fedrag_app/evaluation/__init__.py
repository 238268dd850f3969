"""Measuring the RAG system: answer metrics, the MMLU / Web Questions / retrieval evaluation, per-round reports."""
