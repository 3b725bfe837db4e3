"""RewardConfig: how a finished trajectory is scored (train and eval)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import _help, _require


@dataclass
class RewardConfig:
    """How a finished trajectory is scored (train and eval)."""

    reward: str = field(
        default="auto",
        metadata=_help(
            "'auto' (reasoning-gym's scorer for a task, else math_verify), 'math_verify', 'reasoning_gym', "
            "or 'module:function' with TRL's signature fn(prompts, completions, **columns) -> list[float]."
        ),
    )
    reward_timeout: float = field(
        default=5.0, metadata=_help("Seconds allowed per answer; a timeout scores as a failure (wrong).")
    )
    failure_reward: float = field(
        default=-1.0, metadata=_help("Reward of a trajectory whose reward function raised, hung or returned NaN.")
    )

    def __post_init__(self) -> None:
        _require(self.reward_timeout > 0, f"reward_timeout={self.reward_timeout}: must be > 0 seconds.")
        _require(
            self.reward in ("auto", "math_verify", "reasoning_gym") or ":" in self.reward,
            f"reward={self.reward!r}: use auto, math_verify, reasoning_gym or 'module:function'.",
        )
