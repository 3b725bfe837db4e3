"""What every config module shares: the help-string helper and the one-line validation check."""

from __future__ import annotations

from ..errors import ConfigError


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
