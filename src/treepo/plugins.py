"""Loading a user's code named as 'module:name' (a reward function, an answer predicate, an environment).

One function, so every flag that takes user code fails the same way: a ConfigError that names the
flag, the module and what is wrong (not importable, importing it raised, no such name, the wrong kind).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import os
import sys
from typing import Any

from .errors import ConfigError


def load_callable(spec: str, what: str, *, want_class: bool = False) -> Any:
    """Import 'module:name' for the flag `what`; the object must be callable (a class with `want_class`)."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name.strip() or not attr.strip():
        raise ConfigError(f"{what}={spec!r}: expected 'module:name', a module on the Python path and a name in it.")
    try:
        module = _import(module_name)
    except ImportError as e:
        top = module_name.split(".")[0]
        if isinstance(e, ModuleNotFoundError) and e.name not in (None, top) and not module_name.startswith(f"{e.name}."):
            raise ConfigError(f"{what}={spec!r}: importing module {module_name!r} raised {type(e).__name__}: {e}; "
                              f"install {e.name.split('.')[0]!r} in this environment.") from e
        raise ConfigError(f"{what}={spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); run "
                          f"treepo from the folder that holds {top}.py (or the {top}/ package), or add that folder "
                          f"to PYTHONPATH, e.g. PYTHONPATH=/path/to/folder treepo ...") from e
    except Exception as e:  # noqa: BLE001 - the user's module itself failed while importing
        raise ConfigError(f"{what}={spec!r}: importing module {module_name!r} raised {type(e).__name__}: {e}.") from e
    obj = getattr(module, attr, None)
    kind = "class" if want_class else "callable"
    if obj is None:
        raise ConfigError(f"{what}={spec!r}: module {module_name!r} has no {kind} {attr!r}.")
    if want_class and not inspect.isclass(obj):
        raise ConfigError(f"{what}={spec!r}: {attr!r} is a {type(obj).__name__}, not a class.")
    if not callable(obj):
        raise ConfigError(f"{what}={spec!r}: module {module_name!r} has no callable {attr!r} "
                          f"({attr!r} is a {type(obj).__name__}).")
    return obj


def _import(module_name: str):
    """Import a module; one in the current folder too, as `python -m` would find it.

    The `treepo` console script does not put the current folder on sys.path (`python script.py` and
    `python -m` do), so a reward module beside the user's data would not import; the folder is added
    after every other entry, so it never shadows an installed package.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        top = module_name.split(".")[0]
        on_path = any(os.path.abspath(p or ".") == here for p in sys.path)
        if e.name != top or on_path or importlib.machinery.PathFinder.find_spec(top, [here]) is None:
            raise
        sys.path.append(here)
        return importlib.import_module(module_name)
