"""CPython's own Pool, Queue and Connection tests (Lib/test/_test_multiprocessing.py) pass
against pyparallel: tests/run_cpython_mp.py runs them, one start method per run."""
import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

if importlib.util.find_spec("test._test_multiprocessing") is None:
    pytest.skip("this Python has no test package", allow_module_level=True)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_cpython_pool_queue_connection_groups(method, tmp_path):
    out = subprocess.run([sys.executable, os.path.join(HERE, "run_cpython_mp.py"),
                          "--start-method", method], cwd=tmp_path, capture_output=True,
                         text=True, timeout=540, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-5000:] + out.stdout
    counts = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert set(counts) == {f"{g} ({method})" for g in ("Pool", "QUEUE", "CONNECTION")}
    assert all(c.endswith(" 0 failed, 0 skipped") for c in counts.values()), counts
