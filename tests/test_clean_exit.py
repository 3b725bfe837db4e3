"""A process exits 0 after its work, whatever weight-sync calls were left blocked in torch.

The README's test command once printed "591 passed" and then aborted with "terminate called without
an active exception" (exit 134), by chance. The cause: a weight sync that fails (a dead server, a
refused update) stops waiting for the trainer's half of the rendezvous or broadcast, which stays
blocked in a torch call (TCPStore waiting for its ranks, a gloo wait) with the GIL released until its
own timeout. If that call returns while the interpreter finalises, re-taking the GIL ends the thread
with pthread_exit, and its forced unwinding through pybind11's noexcept `gil_scoped_release`
destructor calls std::terminate. tests/test_weight_sync_remote.py runs last, so its leftovers met
the suite's exit. The fix (`collective._join_left_halves`, atexit) waits for such halves before the
interpreter finalises.

The script below leaves the trainer's half blocked (a 1 s TCPStore wait for a server that is dead),
returns at once, and holds finalisation open for 3 s (an object whose `__del__` sleeps during module
teardown) so that the torch call returns inside it: without the fix it aborts every time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


HERE = Path(__file__).parent

SCRIPT = textwrap.dedent("""
    import threading, time
    from pathlib import Path
    from types import SimpleNamespace

    import tiny
    from fake_weight_server import FakeWeightServer
    from treepo.config import WeightSyncConfig
    from treepo.engines.weight_sync.base import WeightSyncError
    from treepo.engines.weight_sync.sglang import SGLangNcclSync
    from test_weight_sync_remote import free_port

    fake = FakeWeightServer("sglang", tiny.model(seed=0))
    fake.stop()  # dead: the trainer's half (a TCPStore waiting for rank 1) is left to its 1 s timeout
    cfg = WeightSyncConfig(weight_sync="nccl", server_kind="sglang", probe_tokens=4, sync_timeout=1.0,
                           nccl_master_port=free_port(), nccl_backend="gloo")
    engine = SimpleNamespace(pool=SimpleNamespace(servers=[SimpleNamespace(url=fake.url)]), model_name="fake-model")
    try:
        SGLangNcclSync(cfg, engine, tiny.model(seed=0), tiny.tokenizer(), sync_dir=Path({sync_dir!r}))
    except WeightSyncError as e:
        print("refused:", str(e)[:40])
    print("trainer half blocked at exit:", any(t.name == "treepo-sync trainer" for t in threading.enumerate()))

    class SlowTeardown:  # keeps the interpreter finalising while the torch call times out
        def __del__(self, sleep=time.sleep):  # bound now: module teardown sets the global `time` to None first
            sleep(3.0)

    keep = SlowTeardown()
""")


def test_a_sync_left_blocked_in_torch_does_not_abort_the_exit(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "PYTHONFAULTHANDLER": "1"}
    res = subprocess.run([sys.executable, "-c", SCRIPT.format(sync_dir=str(tmp_path / "sync"))], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    # the scenario happened: the join failed fast and the trainer's half was still blocked when the script ended
    assert "refused: server http://127.0.0.1" in res.stdout, res.stdout + res.stderr
    assert "trainer half blocked at exit: True" in res.stdout, res.stdout + res.stderr
    assert "terminate called" not in res.stderr, res.stderr
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])


def test_ci_run_passes_an_abort_through(tmp_path):
    """.ci/run ends with the README's test command: an abort after the last test (exit 134) fails CI."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text((HERE.parent / ".ci" / "run").read_text())
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text("echo setup done\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/usr/bin/env bash\necho '3 passed'\nkill -ABRT $$\n")  # passes, then aborts
    python.chmod(0o755)
    res = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert "setup done" in res.stdout and "3 passed" in res.stdout
    assert res.returncode == 134, (res.returncode, res.stdout, res.stderr)
