#!/usr/bin/env bash
# GPU readiness check: every CUDA path of treepo on random models, in under 8 minutes.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh                 # on a CUDA machine
#   OUT=/tmp/dry bash scripts/gpu_check.sh --cpu-dry-run   # the same code paths on the CPU, toy sizes (< 2 min)
#
# Needs only the machine's own python3 with torch and transformers (PYTHON=... to choose another);
# nothing is installed or downloaded. Writes $OUT/gpu_check.json (see src/treepo/gpu_check/runner.py)
# and $OUT/gpu_check.log. Extra arguments go to `python -m treepo.gpu_check` (e.g. --only greedy).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${OUT:-}" ]; then
    echo "gpu_check.sh: set OUT to the folder for the results, e.g. OUT=/tmp/gpu bash scripts/gpu_check.sh" >&2
    exit 2
fi
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
PYTHON="${PYTHON:-python3}"
LIMIT=460  # seconds: SIGTERM (the JSON is still written), KILL 15 s later: under 8 minutes in all
case " $* " in *" --cpu-dry-run "*) LIMIT=115 ;; esac

export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout -k 15 "$LIMIT" "$PYTHON" -m treepo.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "gpu_check.sh: stopped at the ${LIMIT} s limit; $OUT/gpu_check.json holds the parts that finished" | tee -a "$OUT/gpu_check.log"
fi
exit "$status"
