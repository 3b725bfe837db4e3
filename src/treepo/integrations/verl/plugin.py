"""The `verl.plugins` entry point: `import verl` in every Ray process imports this, which registers
the tree agent loop (`treepo_tree`), the estimators (`treepo`, `treepo_paper`) and the trainer mode
(`treepo`). verl logs a plugin that fails to import at debug level only, so the trainer mode's
start-up check is what reports a broken install (`python -m treepo.integrations.verl` prints it)."""

from __future__ import annotations

from . import agent_loop, estimators, trainer  # noqa: F401  (registration happens on import)
