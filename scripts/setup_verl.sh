#!/usr/bin/env bash
# Create .venv-verl: verl[verl-core] (the range in pyproject.toml's [tool.treepo] verl) next to the torch of .venv, and
# treepo in it (editable) with what its verl adapter imports. Idempotent. verl pins transformers < 5.11 while the
# core needs >= 5.17, so the two cannot share an environment; treepo goes in with --no-deps, and the parts the
# adapter uses (sampler, estimators, rows) import under verl's transformers (tests/verl_plugin checks it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VERL_SPEC=$("$PYTHON" -c "import tomllib; print(tomllib.load(open('pyproject.toml','rb'))['tool']['treepo']['verl'])")
[ -x .venv-verl/bin/python ] || "$PYTHON" -m venv .venv-verl
pip() { .venv-verl/bin/python -m pip "$@"; }
quiet() { grep -v "is ignored" || true; }
pip install -q --upgrade pip 2>&1 | quiet
TORCH=$( (.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null) || echo 2.13.0)
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH" > "$CONSTRAINTS"  # verl's extras would otherwise move torch (its vllm/sglang extras pin 2.11)
if ! .venv-verl/bin/python -c "import verl, transfer_queue, ray" 2>/dev/null; then
    echo "setup: installing $VERL_SPEC into .venv-verl (torch==$TORCH held)"
    pip install -q "torch==$TORCH" 2>&1 | quiet
    pip install -q "$VERL_SPEC" pytest pytest-timeout -c "$CONSTRAINTS" 2>&1 | quiet
fi
pip install -q --no-deps -e . 2>&1 | quiet
.venv-verl/bin/python -c "import verl, treepo.integrations.verl.plugin; print(f'setup: .venv-verl has verl {verl.__version__}')" 2>&1 \
    | grep -v -e "engine is not available" -e "warnings.warn" -e "accelerator detected" -e "registered but not available"
