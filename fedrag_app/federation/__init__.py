"""Federation without Flower: what travels between nodes and its checks (exchange.py), a node's setup for a message
(node_setup.py), LoRA aggregation, personal adapters, institutions' data partitions, checkpoints, and federated
question answering."""
