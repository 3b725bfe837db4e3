"""Adapters that run TreePO inside other training libraries (optional extras).

- `treepo.integrations.trl`: TreePO inside TRL's GRPOTrainer (`pip install 'treepo[trl]'`).

Nothing in the core package imports these: each adapter imports its library itself, and fails with
the install command when it is missing.
"""
