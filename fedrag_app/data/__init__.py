"""Datasets as plain records: Web Questions, MMLU and the passage corpus, from a local folder or the hub."""
