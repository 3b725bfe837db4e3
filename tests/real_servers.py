"""What the real-server test modules share: the skip-or-fail gate and the no-leftover-server guards.

    require(llama_server_binary() is not None, "llama-server is not built", "bash scripts/build_llama_server.sh")
    no_server_outlives_the_module, no_server_outlives_its_test = leak_guards("llama-server", MODULE_SERVERS)

A module whose server is missing is skipped, unless TREEPO_REQUIRE_SERVER=1 (CI and the README's
test command, after `scripts/setup.sh --server` built everything): then it fails.
"""

from __future__ import annotations

import os

import pytest

from treepo.engines.local_server import live_servers


def require(available: bool, missing: str, fix: str) -> None:
    """Skip the calling module (at import) when its server is missing; fail instead under TREEPO_REQUIRE_SERVER=1."""
    if available:
        return
    if os.environ.get("TREEPO_REQUIRE_SERVER") == "1":
        raise RuntimeError(f"TREEPO_REQUIRE_SERVER=1 but {missing}: run `{fix}` (scripts/setup.sh --server does).")
    pytest.skip(f"{missing} ({fix})", allow_module_level=True)


def leak_guards(name: str, module_servers: set[int]):
    """Two autouse fixtures: no `name` process outlives its test (apart from the pids in `module_servers`, a
    module-scoped server's), and none outlives the module. Bind both as module globals of the test module; the
    module one is set up before (so torn down after) any module-scoped server fixture."""

    @pytest.fixture(scope="module", autouse=True)
    def no_server_outlives_the_module():
        yield
        left = live_servers()
        assert not left, f"{name} processes still running after the module: {left}"

    @pytest.fixture(autouse=True)
    def no_server_outlives_its_test():
        before = set(live_servers())
        yield
        leaked = set(live_servers()) - before - module_servers
        assert not leaked, f"a test left {name} processes running: {sorted(leaked)}"

    return no_server_outlives_the_module, no_server_outlives_its_test
