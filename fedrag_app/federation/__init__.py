"""Federation without Flower: what travels between nodes and its checks, LoRA aggregation, personal adapters,
institutions' data partitions, checkpoints, and federated question answering."""
