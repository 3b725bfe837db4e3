"""TreePOTrainer: TRL's GRPOTrainer with TreePO tree rollouts and tree advantages.

Where it hooks into GRPOTrainer (TRL 1.16), and why there rather than `rollout_func`:

- `_generate_single_turn(prompt_ids, ...)` is the one place TRL turns tokenized prompts into
  completion ids and sampled log-probs. TRL has already rendered and tokenized the prompts exactly
  as it does for GRPO (chat template, tools off), and afterwards decodes the completions, calls the
  reward functions with the dataset's extra columns, computes the reference and old log-probs and
  builds the loss inputs, all unchanged. A `rollout_func` would have to re-do the prompt rendering
  and would still need the advantage override below, so the subclass is the smaller seam.
  Here each run of `num_generations` identical rows becomes one tree, grown by treepo's
  `TreeSampler` on treepo's embedded `TransformersEngine` running the trainer's own model (no
  copy: the 'hf' backend calls the model's forward; weights and cache are re-read before every
  rollout, so after every optimizer step). Tree g's k-th leaf becomes row g * width + k.
- `_calculate_rewards` is wrapped only to keep the rewards TRL computed (all processes' rows).
- `_generate_and_score_completions` runs TRL's version, then replaces its per-group advantages
  ([B]) by treepo's per-token tree advantages ([B, T], which TRL's loss accepts), and logs the
  trees' metrics under `treepo/` through TRL's metrics.

Setups the tree sampler cannot serve are refused at construction with the fix (tools,
environments, a rollout_func, vision inputs, DeepSpeed/FSDP sharded weights); a model the embedded
engine cannot run is refused, or with `treepo_on_unsupported='trl'` trained with TRL's own
generation and GRPO advantages after a logged warning (and the metric `treepo/trl_generation` = 1).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import replace
from typing import Any, Optional

import torch
from trl import GRPOTrainer

from ...config import EngineConfig
from ...engines.transformers_engine import TransformersEngine
from ...errors import TreepoError
from ...rollout.sampler import TreeSampler
from .config import TreePOConfig
from .rollout import completions, prompt_groups, row_advantages, tree_metrics

log = logging.getLogger(__name__)

# The GRPOTrainer methods overridden here, with the parameters this code relies on.
HOOKS = {
    "_generate_single_turn": ("prompt_ids", "images", "multimodal_fields", "num_generations"),
    "_calculate_rewards": ("inputs", "prompts", "completions", "completion_ids_list"),
    "_generate_and_score_completions": ("inputs",),
}


def check_hooks(cls=GRPOTrainer) -> None:
    """Fail at import, naming the method, if this TRL's GRPOTrainer lacks a hook the adapter overrides."""
    import trl

    for name, params in HOOKS.items():
        method = getattr(cls, name, None)
        have = list(inspect.signature(method).parameters)[1:] if method is not None else None
        if have is None or list(have[: len(params)]) != list(params):
            raise ImportError(
                f"TRL {trl.__version__}: GRPOTrainer.{name}{'' if have is None else tuple(have)} is not the "
                f"{name}{params} that treepo.integrations.trl overrides (written against TRL 1.16); "
                "install a supported TRL: pip install 'trl>=1.16,<2'."
            )


check_hooks()


MEAN_METRICS = ("saving_vs_own_leaves", "estimated_saving_vs_independent", "depth_mean", "distinct_leaves_per_group")


class TreePOTrainer(GRPOTrainer):
    """GRPOTrainer whose completions are TreePO trees and whose advantages are tree advantages.

    Takes GRPOTrainer's arguments; `args` must be a `TreePOConfig`. After each generation,
    `treepo_last` holds the trees, their rewards and the advantages handed to TRL's loss.
    """

    def __init__(self, model, reward_funcs=None, args: Optional[TreePOConfig] = None, *pos, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = TreePOConfig(output_dir=f"{str(name).split('/')[-1] or 'model'}-TreePO")
        if not isinstance(args, TreePOConfig):
            raise TypeError(f"TreePOTrainer needs args=TreePOConfig(...), not {type(args).__name__}: TreePOConfig "
                            "takes every GRPOConfig field plus the treepo_ ones.")
        if pos:
            raise TypeError("TreePOTrainer: pass train_dataset and the rest by keyword (train_dataset=..., ...).")
        for name, why in (("rollout_func", "TreePO is the rollout"), ("tools", "tool calls inside a tree's "
                          "segments are not supported"), ("environment_factory", "environments are not supported")):
            if kwargs.get(name) is not None:
                raise ValueError(f"TreePOTrainer: {name}= is not supported ({why}); drop it, or train with "
                                 "GRPOTrainer.")
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self.treepo_last: dict[str, Any] = {}
        self._treepo_rewards: Optional[torch.Tensor] = None
        self._treepo_trees = None
        self.treepo_fallback_reason: Optional[str] = None
        self.treepo_engine = None
        self._treepo_samplers: dict[int, TreeSampler] = {}
        try:
            self.treepo_engine = self._treepo_build_engine()
        except TreepoError as e:  # a setup treepo knows it cannot serve
            self._treepo_unsupported(str(e))
        except (RuntimeError, TypeError, AttributeError, NotImplementedError) as e:  # a model whose forward the
            self._treepo_unsupported(f"{type(e).__name__}: {e}")  # engine's cache probe cannot drive

    # -- the engine --------------------------------------------------------------------------
    def _treepo_unsupported(self, reason: str) -> None:
        if self.args.treepo_on_unsupported != "trl":
            raise ValueError(
                f"TreePOTrainer: the embedded engine cannot run this setup: {reason}. Use a supported model, or set "
                "treepo_on_unsupported='trl' to train with TRL's own generation and GRPO advantages."
            )
        self.treepo_fallback_reason = reason
        log.warning("TreePO is off for this run (%s): TRL's own generation and GRPO advantages are used", reason)

    def _treepo_build_engine(self):
        """treepo's engine for this trainer: the embedded one on the live model, or (vLLM server mode) a
        client of TRL's vLLM server."""
        from ...errors import ConfigError

        if self.use_vllm:  # vllm_mode='server' (TreePOConfig refuses colocate)
            from .vllm import VLLMServerEngine

            if self.accelerator.num_processes > 1:
                raise ConfigError("vLLM server mode with TreePO runs on one training process for now (the trees' "
                                  "segment requests go through the main process's client); launch one process, "
                                  "or use the embedded engine (use_vllm=False)")
            return VLLMServerEngine(self.vllm_generation.vllm_client, self._tokenizer, temperature=self.temperature,
                                    top_p=self.top_p, top_k=self.top_k, eos_ids=self.eos_token_ids,
                                    max_context=self.args.vllm_max_model_length or self._treepo_context())
        if getattr(self, "_is_vlm", False):
            raise ConfigError("vision-language models are not supported by the tree sampler")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ConfigError("DeepSpeed / FSDP shard the weights the embedded engine reads; train on DDP or one "
                              "device, or use use_vllm=True, vllm_mode='server'")
        model = self.accelerator.unwrap_model(self.model)
        backend = self.args.treepo_backend
        if getattr(model, "peft_config", None) is not None and hasattr(model, "get_base_model"):
            # PEFT injects its adapter layers into the base model's modules, so the base model's own forward
            # runs them (the 'hf' backend); the lean decoder would read the frozen base weights only.
            model = model.get_base_model()
            if backend != "hf":
                log.info("PEFT model: the embedded engine uses the model's own forward (backend 'hf'), adapters included")
            backend = "hf"
        engine_cfg = EngineConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0,
                                  backend=backend)
        was_training = model.training
        try:
            engine = TransformersEngine(model, self._tokenizer, engine_cfg,
                                        seed=self.args.seed + self.accelerator.process_index)
        finally:
            model.train(was_training)
        # TRL ends a completion at any of its EOS ids; so does the engine.
        engine.eos_ids = frozenset(engine.eos_ids) | frozenset(self.eos_token_ids)
        engine._eos = torch.tensor(sorted(engine.eos_ids), dtype=torch.long, device=engine.device)
        return engine

    def _treepo_context(self) -> int:
        from ...engines.transformers_engine import context_length

        return context_length(self.accelerator.unwrap_model(self.model).config)

    def _treepo_sampler(self, width: int) -> TreeSampler:
        if width not in self._treepo_samplers:
            cfg = replace(self.args.treepo_sampler_config(width), seed=self.args.seed + self.accelerator.process_index)
            self._treepo_samplers[width] = TreeSampler(cfg, self.treepo_engine)
        return self._treepo_samplers[width]

    # -- generation ----------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.treepo_engine is None:  # treepo_on_unsupported='trl': TRL's own generation
            self._treepo_trees = None
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        if images is not None or multimodal_fields:
            raise ValueError("TreePOTrainer: image inputs are not supported by the tree sampler.")
        prompts = prompt_groups(prompt_ids, num_generations)
        sampler = self._treepo_sampler(num_generations)
        max_steps = max(int(getattr(self.state, "max_steps", 0) or 0), 1)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()  # no dropout while sampling; TRL's step puts train mode back
        if self.use_vllm and self.state.global_step != self._last_loaded_step:  # as TRL's own vLLM path
            self.vllm_generation.sync_weights()
            self._last_loaded_step = self.state.global_step
        try:
            self.treepo_engine.sync_weights()  # this step's weights; drops any KV cache of older ones
            result = sampler.rollout(prompts, progress=min(self.state.global_step / max_steps, 1.0))
        finally:
            model.train(was_training)
        self._treepo_trees = result.trees
        self._treepo_result = result
        ids, logps = completions(result.trees)
        return ids, logps

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._treepo_rewards = rewards
        return rewards

    # -- advantages ----------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        self._treepo_trees = None
        self._treepo_rewards = None
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        if self._treepo_trees is None:
            self._metrics[mode]["treepo/trl_generation"].append(1.0)
            return output
        trees, per_func = self._treepo_trees, self._treepo_rewards
        n = len(inputs)
        rank = self.accelerator.process_index
        local = per_func[rank * n : (rank + 1) * n]
        weights = self.reward_weights.to(local.device)
        rewards = (local * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(local).all(dim=1)] = torch.nan
        acc = self.accelerator
        reduce_sum = (lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu()) if acc.num_processes > 1 else None
        advs = row_advantages(trees, rewards.tolist(), self.args.treepo_advantage, self.args.treepo_whitening,
                              reduce_sum)
        width = output["completion_ids"].size(1)
        table = torch.zeros(len(advs), width, dtype=torch.float32)
        for i, a in enumerate(advs):
            table[i, : len(a)] = torch.tensor(a, dtype=torch.float32)
        output["advantages"] = table.to(output["completion_ids"].device)
        self.treepo_last = {"trees": trees, "rewards": rewards.tolist(), "advantages": output["advantages"]}
        self._treepo_log(mode, advs, output)
        return output

    def _treepo_log(self, mode: str, advs, output) -> None:
        """The trees' metrics under treepo/, and the completions table's advantage column as the tree's."""
        from accelerate.utils import gather_object

        metrics = tree_metrics(self._treepo_result, self._treepo_sampler(self._treepo_trees[0].group_size).cfg)
        for name, value in metrics.items():
            total = self.accelerator.gather(torch.tensor([value], device=self.accelerator.device))
            reduced = total.max() if name.endswith("_max") else total.mean() if name in MEAN_METRICS else total.sum()
            self._metrics[mode][f"treepo/{name}"].append(float(reduced))
        self._metrics[mode]["treepo/trl_generation"].append(0.0)
        # TRL logged its own per-completion advantages for the completions table; show the tree's (token mean).
        means = [sum(a) / len(a) if a else 0.0 for a in advs]
        everyone = gather_object(means) if self.accelerator.num_processes > 1 else means
        logged = self._logs["advantages"]
        for _ in range(min(len(everyone), len(logged))):
            logged.pop()
        logged.extend(everyone)
