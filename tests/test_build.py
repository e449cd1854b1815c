"""The pthread fallback: a build without OpenMP gives the same kernels, also fork-safe and
cancellable."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

CHECK = r"""
import os, sys
sys.path.insert(0, os.getcwd())
import pyparallel
from pyparallel import kernels
assert pyparallel.__file__.startswith(os.getcwd()), pyparallel.__file__
assert kernels.openmp is False
def f(n):
    return 1 if n <= 2 else f(n - 1) + f(n - 2)
xs = list(range(-2, 26))
assert kernels.fib.map(xs, threads=3) == [f(x) for x in xs]
assert kernels.cube_loop.map([10, 100000], threads=2) == [sum(i**3 for i in range(n)) for n in (10, 100000)]
pid = os.fork()
if pid == 0:
    os._exit(0 if kernels.fib.map(range(20, 26), threads=2) == [f(x) for x in range(20, 26)] else 1)
assert len(os.listdir("/proc/self/task")) == 1   # the idle team was taken down for fork()
_, status = os.waitpid(pid, 0)
assert status == 0, status
import threading, time
tok, box = kernels.CancelToken(), []
def run():
    try:
        kernels.fib.map([70] * 4, threads=2, cancel=tok)
    except kernels.KernelCancelled as e:
        box.append(e)
t = threading.Thread(target=run, daemon=True)
t.start()
time.sleep(0.2)
tok.cancel()
t.join(10)
assert not t.is_alive() and len(box) == 1
assert kernels.fib.map(range(20, 26), threads=2) == [f(x) for x in range(20, 26)]
print("fallback ok")
"""


@pytest.mark.timeout(300)
def test_pthread_fallback_build(tmp_path):
    for name in ("src", "pyparallel"):
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    env = dict(os.environ, PYPARALLEL_NO_OPENMP="1", PYPARALLEL_STRICT="1")
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert "not available, using pthreads" in build.stderr
    run = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "fallback ok" in run.stdout, run.stderr
