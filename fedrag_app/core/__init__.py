"""Foundations every layer may use: error classes, atomic file writes, where FEDRAG_* settings come from, verbosity.

Imports nothing else from fedrag_app."""
