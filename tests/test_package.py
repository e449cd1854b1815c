"""The package: version agreement, the import-time check, the command line."""
import importlib
import pathlib
import re
import subprocess
import sys

import pyparallel
from pyparallel import _core

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_versions_agree():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == pyparallel.__version__
    assert _core.__version__ == pyparallel.__version__


def test_import_refuses_a_mismatched_core():
    code = ("import importlib, pyparallel\n"
            "pyparallel._core.__version__ = '0.0.0-stale'\n"
            "try:\n    importlib.reload(pyparallel)\nexcept ImportError as e:\n    print('refused', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("refused") and "rebuild" in out.stdout, out


def test_default_threads_set_from_cpu_count(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    importlib.reload(pyparallel)
    assert _core.get_default_threads() == pyparallel.cpu_count()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    importlib.reload(pyparallel)
    assert _core.get_default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    importlib.reload(pyparallel)


def test_demo_runs_and_checks_answers():
    out = subprocess.run([sys.executable, "-m", "pyparallel", "demo", "--workers", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for needle in ("Naive fib", "Cube loop", "multiprocessing.Pool", "kernels.fib.map",
                   "('type2', 9, 27)"):
        assert needle in out.stdout
