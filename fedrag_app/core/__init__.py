"""Foundations every layer may use: error classes, atomic file writes, where FEDRAG_* settings come from, verbosity,
process-wide torch state (seeds, threads, CUDA memory).

Imports nothing else from fedrag_app."""
