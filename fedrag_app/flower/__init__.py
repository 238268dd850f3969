"""The Flower edge, the only place that imports flwr: records, server strategies, the ClientApp and the ServerApp."""
