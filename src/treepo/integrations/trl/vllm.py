"""treepo's engine protocol over TRL's vLLM server client (`use_vllm=True, vllm_mode="server"`).

`trl vllm-serve` holds the policy's weights; TRL's `VLLMClient` syncs them after every optimizer
step (the trainer calls TRL's own `sync_weights`). Each sampler round becomes
`VLLMClient.generate` calls (POST /v1/completions with token-id prompts, n=1, the sampled token's
log-prob), one per distinct segment budget: a request's prompt is its full context (the prompt and
its ancestors' segments), and vLLM's prefix cache shares what siblings have in common. vLLM
returns no sampling entropies, so the 'entropy' divergence policy is refused with this engine.
"""

from __future__ import annotations

import math
from typing import Sequence

from ...engines.base import EngineStats, SegmentOutput, SegmentRequest


class VLLMServerEngine:
    """`Engine` that generates through a TRL `VLLMClient` (the main process's)."""

    def __init__(self, client, tokenizer, *, temperature: float, top_p: float, top_k: int,
                 eos_ids: Sequence[int], max_context: int):
        self.client = client
        self.tokenizer = tokenizer
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k or 0
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.max_context = max_context
        self.stats = EngineStats()

    def generate(self, requests: Sequence[SegmentRequest]) -> list[SegmentOutput]:
        outputs: list[SegmentOutput | None] = [None] * len(requests)
        by_budget: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_budget.setdefault(r.max_new_tokens, []).append(i)
        for budget, rows in by_budget.items():
            prompts = [requests[i].context_ids() for i in rows]
            out = self.client.generate(prompts=prompts, n=1, temperature=self.temperature, top_p=self.top_p,
                                       top_k=self.top_k, max_tokens=budget, logprobs=0)
            self.stats.generate_calls += 1
            ids_all, lps_all = out["completion_ids"], out.get("logprobs")
            if len(ids_all) != len(rows) or lps_all is None:
                raise RuntimeError(f"the vLLM server answered {len(ids_all)} completions for {len(rows)} prompts"
                                   f"{'' if lps_all is not None else ' without log-probs'}; TreePO needs one "
                                   "completion with its sampled-token log-probs per segment request.")
            for i, ids, lps in zip(rows, ids_all, lps_all):
                ids = list(ids)[:budget]
                logps = [math.nan if (not pos or pos[0] is None) else float(pos[0]) for pos in lps][: len(ids)]
                outputs[i] = SegmentOutput(ids, logps, [0.0] * len(ids), bool(ids) and ids[-1] in self.eos_ids)
                self.stats.decode_tokens += len(ids)
        return outputs  # type: ignore[return-value]

    def release(self, group: int) -> None:
        pass  # the server's prefix cache is its own

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def reseed(self, seed: int) -> None:
        pass  # no per-request seed: siblings share their prompt, so one seed would make them identical

    def sync_weights(self) -> None:
        pass  # TRL's VLLMGeneration.sync_weights pushes the weights (called by the trainer)
