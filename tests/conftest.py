import importlib.util
import os
import sys

import pytest

# tests/verl_plugin runs in .venv-verl (verl pins transformers below treepo's), driven by tests/test_verl.py
collect_ignore = [] if getattr(importlib.util.find_spec("verl"), "origin", None) else ["verl_plugin"]  # a real verl

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (fakes, tiny models) by name


@pytest.fixture(scope="session", autouse=True)
def no_treepo_server_outlives_the_session():
    """Whatever failed, no server that treepo's LocalServerProcess started is left running after the tests."""
    yield
    local_server = sys.modules.get("treepo.engines.local_server")
    if local_server is None:  # never imported: nothing was started
        return
    left = local_server.live_servers()
    local_server._stop_all()
    assert not left, f"servers started by the tests were still running at the end (now killed): {left}"
