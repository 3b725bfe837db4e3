"""Environments for multi-turn tree rollouts: the protocol (`base`), and two built-ins.

- `Environment`, `EnvTurn`, `PathView`: the protocol a user subclasses (see `base`);
- `CalculatorEnv` ('calculator'): a safe arithmetic tool behind <calc>...</calc> (`safe_eval`);
- `RecheckEnv` ('recheck'): the "re-check your answer" follow-up loop;
- `load_env`: `--env NAME` or `--env module:Class` -> an instance, or a clear ConfigError.
"""

from .base import EnvError, Environment, EnvTurn, PathView, Turn, load_env, system_prompt_with
from .calculator import CalculatorEnv
from .recheck import RecheckEnv

__all__ = ["CalculatorEnv", "EnvError", "EnvTurn", "Environment", "PathView", "RecheckEnv", "Turn", "load_env",
           "system_prompt_with"]
