"""User-facing errors: each message names the field or input at fault and how to fix it.

The CLI prints these without a traceback and exits non-zero; anything else is a bug.
"""


class TreepoError(ValueError):
    """Base of every error caused by the user's input rather than by treepo."""


class ConfigError(TreepoError):
    """A configuration value that cannot work."""


class InputError(TreepoError):
    """A model path, prompts file, dataset row or prompt that cannot be used."""


class ServerError(TreepoError):
    """A generation server that cannot be reached, is too slow, or answers with something unusable."""


class RewardError(TreepoError):
    """A reward function that failed on every sample of a training step, or on too many samples of an evaluation."""
