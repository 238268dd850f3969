"""Local training of the RAG system: sequences and batching, LM scoring, RALT, LSR, one local round, and the
centralized run (the one-node case of the same round)."""
