"""What a verl config must say for TreePO, read and checked before any work (no verl import here).

A verl run selects treepo with four lines; the tree's own settings go in an optional `treepo:` block of
the same config (Hydra: `+treepo.segment_len=512`), whose keys are `SamplerConfig`'s fields, plus
`advantage` and `whitening` as in `treepo train`, and `round_timeout`:

    trainer.use_v1=True trainer.v1.trainer_mode=treepo
    actor_rollout_ref.rollout.agent.default_agent_loop=treepo_tree
    algorithm.adv_estimator=treepo            # or treepo_paper (the paper's Eq. 5 'average')
    actor_rollout_ref.rollout.n=16            # the tree width w

`check_config` refuses, naming the setting and the fix, whatever treepo cannot honour; the trainer mode
runs it at start-up, the agent loop and the estimators again where they run (they can be selected
without the trainer mode).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ...config import SamplerConfig, TrainConfig
from ...config.sampler import TrainSamplerConfig
from ...errors import ConfigError

AGENT_LOOP = "treepo_tree"  # rollout.agent.default_agent_loop
TRAINER_MODE = "treepo"  # trainer.v1.trainer_mode
# verl estimator name -> treepo's estimator ('treepo': treepo train's default; 'treepo_paper': Eq. 5)
ESTIMATORS = {"treepo": TrainConfig.__dataclass_fields__["advantage"].default, "treepo_paper": "average"}
# Rollout backends whose verl server takes token ids with a per-call max_tokens and returns token ids
# (read in verl 0.9.1: vLLMHttpServer.generate, SGLangHttpServer.generate).
TOKEN_ID_BACKENDS = ("vllm", "sglang")
# SamplerConfig fields the verl adapter sets itself or cannot honour.
FIXED = {"width": "actor_rollout_ref.rollout.n", "mode": "(always 'tree')"}
UNSUPPORTED = {"env": "multi-turn environments", "env_args": "multi-turn environments",
               "segment_mode": "turn segments", "max_turns": "multi-turn environments"}
EXTRA = {"advantage", "whitening", "round_timeout"}  # the block's keys that are not SamplerConfig fields


def get(config: Any, path: str, default: Any = None) -> Any:
    """config['a']['b'] for path 'a.b' on a DictConfig or dict; `default` where a key is missing."""
    node = config
    for key in path.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(key, None)
    return default if node is None else node


@dataclass
class TreeSettings:
    """The tree, the estimator and the normalisation one verl run uses."""

    sampler: SamplerConfig
    advantage: str  # treepo's estimator name (train/advantages.py)
    whitening: str  # treepo's normalisation of the step's advantages
    # Seconds one round of a tree's segments may take before the tree is abandoned as hung (0 = wait, as verl's
    # own agent loops do). A dead server fails at once either way.
    round_timeout: float = 0.0


def tree_settings(config: Any) -> TreeSettings:
    """The `treepo:` block and the rollout settings as treepo's configs; ConfigError names a bad key."""
    block = dict(get(config, "treepo", {}) or {})
    n = int(get(config, "actor_rollout_ref.rollout.n", 1))
    response_length = int(get(config, "actor_rollout_ref.rollout.response_length", 0))
    names = {f.name for f in dataclasses.fields(TrainSamplerConfig)}
    for key in block:
        if key in FIXED:
            raise ConfigError(f"treepo.{key}: set by verl ({FIXED[key]}), not in the treepo block; drop it"
                              + (" and set actor_rollout_ref.rollout.n to the tree width." if key == "width" else "."))
        if key in UNSUPPORTED:
            raise ConfigError(f"treepo.{key}: the verl adapter grows single-turn trees ({UNSUPPORTED[key]} are not "
                              "supported there yet); drop it, or use `treepo train` for environments.")
        if key not in names and key not in EXTRA:
            raise ConfigError(f"treepo.{key}: not a treepo setting; use one of "
                              f"{', '.join(sorted((names - set(FIXED) - set(UNSUPPORTED)) | EXTRA))}.")
    advantage = block.pop("advantage", None)
    whitening = block.pop("whitening", None)
    round_timeout = block.pop("round_timeout", 0)
    try:
        round_timeout = float(round_timeout)
    except (TypeError, ValueError):
        round_timeout = -1.0
    if not round_timeout >= 0:
        raise ConfigError(f"treepo.round_timeout={block.get('round_timeout', round_timeout)!r}: give seconds >= 0 "
                          "(0 = no limit), e.g. +treepo.round_timeout=600.")
    estimator = str(get(config, "algorithm.adv_estimator", ""))
    if advantage is None:
        advantage = ESTIMATORS.get(estimator, ESTIMATORS["treepo"])
    segment_len = int(block.get("segment_len", TrainSamplerConfig.__dataclass_fields__["segment_len"].default))
    if "depth" not in block and response_length:
        block["depth"] = max(1, response_length // segment_len)
    try:
        train = TrainConfig(advantage=advantage, whiten=whitening)
        sampler = TrainSamplerConfig(**{**block, "width": n, "mode": "tree"})
    except ConfigError as e:
        raise ConfigError(f"the treepo block of the verl config: {e}") from None
    except TypeError as e:
        raise ConfigError(f"the treepo block of the verl config: {e}") from None
    if response_length and sampler.response_budget > response_length:
        raise ConfigError(
            f"treepo.depth={sampler.depth} x treepo.segment_len={sampler.segment_cap} = {sampler.response_budget} "
            f"response tokens exceeds actor_rollout_ref.rollout.response_length={response_length}: lower treepo.depth "
            "or raise response_length (verl pads every response to it).")
    return TreeSettings(sampler, train.advantage, train.whitening, round_timeout)


def validation_sampler(sampler: SamplerConfig, width: int) -> SamplerConfig:
    """The sampler of a validation pass whose width (val_kwargs.n) is not the training width: independent draws,
    in the training tree's segments (a width-1 "tree" is one path; mean accuracy is the policy's either way)."""
    defaults = {f.name: f.default for f in dataclasses.fields(SamplerConfig)
                if f.name in ("init_divergence", "init_divergence_max", "fork_depth")}
    return dataclasses.replace(sampler, width=width, mode="independent", shape="fixed", **defaults)


def check_config(config: Any, *, where: str) -> TreeSettings:
    """Refuse a verl config treepo cannot honour, naming the setting and the fix; the settings if it can.

    `where` says who checks ('trainer', 'agent_loop', 'estimator'), for the message."""
    problems: list[str] = []
    mode = get(config, "trainer.v1.trainer_mode")
    if not get(config, "trainer.use_v1", False):
        problems.append(f"trainer.use_v1 is off: TreePO runs in verl's v1 trainer; set trainer.use_v1=True "
                        f"trainer.v1.trainer_mode={TRAINER_MODE}.")
    elif mode != TRAINER_MODE:
        problems.append(f"trainer.v1.trainer_mode={mode}: TreePO needs trainer.v1.trainer_mode={TRAINER_MODE} (a "
                        "synchronous trainer; in the async modes the weights can change in the middle of a tree, and "
                        "their advantage step cannot see the tree).")
    loop = get(config, "actor_rollout_ref.rollout.agent.default_agent_loop")
    if loop != AGENT_LOOP:
        problems.append(f"actor_rollout_ref.rollout.agent.default_agent_loop={loop}: the tree estimators need the tree "
                        f"rollout; set it to {AGENT_LOOP}.")
    estimator = get(config, "algorithm.adv_estimator")
    if str(estimator) not in ESTIMATORS:
        problems.append(f"algorithm.adv_estimator={estimator}: tree rollouts are trained with a tree estimator; set it "
                        f"to {' or '.join(ESTIMATORS)} (treepo.advantage=grpo gives GRPO's on the tree's rows).")
    backend = get(config, "actor_rollout_ref.rollout.name")
    if backend not in TOKEN_ID_BACKENDS:
        problems.append(f"actor_rollout_ref.rollout.name={backend}: the tree grows segment by segment through token-id "
                        f"generation with a per-call max_tokens, which treepo has checked for "
                        f"{' and '.join(TOKEN_ID_BACKENDS)} only; use one of them.")
    manager = get(config, "actor_rollout_ref.rollout.agent.agent_loop_manager_class")
    if manager:
        problems.append(f"actor_rollout_ref.rollout.agent.agent_loop_manager_class={manager}: the tree groups a prompt's "
                        "n sessions as verl's own AgentLoopManagerTQ starts them; drop the custom manager.")
    if get(config, "actor_rollout_ref.rollout.full_determinism", False):
        problems.append("actor_rollout_ref.rollout.full_determinism=True: verl then hands the caller's request id to the "
                        "server, and a tree's concurrent segments share one (for sticky routing); set it to False.")
    prompt_length = int(get(config, "actor_rollout_ref.rollout.prompt_length", 0))
    response_length = int(get(config, "actor_rollout_ref.rollout.response_length", 0))
    max_model_len = get(config, "actor_rollout_ref.rollout.max_model_len")
    if max_model_len is not None and int(max_model_len) < prompt_length + response_length:
        problems.append(f"actor_rollout_ref.rollout.max_model_len={max_model_len} is below prompt_length + response_length "
                        f"= {prompt_length + response_length}: the servers would cut segments short, which reads as an "
                        "end of answer; raise max_model_len or leave it unset.")
    if get(config, "actor_rollout_ref.rollout.multi_turn.enable", False):
        problems.append("actor_rollout_ref.rollout.multi_turn.enable=True: the tree agent loop is single-turn; "
                        "set it to False.")
    settings: Optional[TreeSettings] = None
    try:
        settings = tree_settings(config)
        val_n = int(get(config, "actor_rollout_ref.rollout.val_kwargs.n", 1))
        if val_n != settings.sampler.width:
            try:
                validation_sampler(settings.sampler, val_n)
            except ConfigError as e:
                problems.append(f"actor_rollout_ref.rollout.val_kwargs.n={val_n}: validation samples independently at "
                                f"that width, which the treepo block does not allow ({e}).")
    except ConfigError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(f"treepo cannot run this verl config ({where}):\n- " + "\n- ".join(problems))
    assert settings is not None
    return settings
