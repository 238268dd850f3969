"""fedrag_app: federated fine-tuning of retrieval-augmented generation on Flower."""

__version__ = "0.1.0"
