"""pyparallel.Process: multiprocessing.Process's API (CPython's _TestProcess cases, restated),
the default-context start-method rule, and targets that only cloudpickle can send (lambdas,
closures) under every start method."""
import multiprocessing as mp
import os
import signal
import sys
import time

import pytest

import pyparallel as pp

METHODS = [m for m in ("fork", "forkserver", "spawn") if m in mp.get_all_start_methods()]


def _report(q, *args, **kwargs):
    proc = mp.current_process()
    q.put((args, kwargs, proc.name, os.getpid(), proc.daemon))


def _exit_with(code):
    sys.exit(code)


def _raise():
    raise RuntimeError("boom")


def _sleep(t):
    time.sleep(t)


class _Sub(pp.Process):
    def __init__(self, q):
        super().__init__()
        self.q = q

    def run(self):
        self.q.put("run " + self.name)


@pytest.mark.parametrize("method", METHODS)
def test_process_api(method):
    q = pp.Queue()
    p = pp.Process(target=_report, args=(q, 1, 2), kwargs={"k": 3}, name="worker-x",
                   context=method)
    assert p.name == "worker-x" and p.pid is None and p.exitcode is None
    assert not p.is_alive() and p.daemon is False
    p.daemon = True
    p.start()
    args, kwargs, name, pid, daemon = q.get(timeout=60)
    p.join(60)
    assert (args, kwargs, name, daemon) == ((1, 2), {"k": 3}, "worker-x", True)
    assert pid == p.pid == p.ident and p.exitcode == 0 and not p.is_alive()
    assert isinstance(p.sentinel, int)
    with pytest.raises(AssertionError, match="cannot start a process twice"):
        p.start()
    p.close()
    with pytest.raises(ValueError):
        p.is_alive()


@pytest.mark.parametrize("method", METHODS)
def test_lambda_and_closure_targets(method):
    q = pp.Queue()
    base = 40
    p = pp.Process(target=lambda q, x: q.put(x + base + 1), args=(q, 1), context=method)
    p.start()
    assert q.get(timeout=60) == 42
    p.join(60)
    assert p.exitcode == 0

    def closure(q):
        q.put(("closure", base))
    p = pp.Process(target=closure, args=(q,), context=method)
    p.start()
    assert q.get(timeout=60) == ("closure", 40)
    p.join(60)


def test_lambda_target_fails_with_multiprocessing_under_spawn():
    # what pp.Process fixes: the stdlib cannot send it
    p = mp.get_context("spawn").Process(target=lambda: None)
    with pytest.raises(Exception):
        p.start()


@pytest.mark.parametrize("method", METHODS)
def test_exitcodes(method):
    p = pp.Process(target=_exit_with, args=(3,), context=method)
    p.start()
    p.join(60)
    assert p.exitcode == 3
    p = pp.Process(target=_raise, context=method)
    p.start()
    p.join(60)
    assert p.exitcode == 1


@pytest.mark.parametrize("how, sig", [("terminate", signal.SIGTERM), ("kill", signal.SIGKILL)])
def test_terminate_and_kill(how, sig):
    # only this test's children: a warm pool another test left running has its workers in
    # active_children(), as multiprocessing.Pool's and loky's do
    before = set(mp.active_children())
    p = pp.Process(target=_sleep, args=(600,))
    p.start()
    assert p.is_alive()
    assert set(mp.active_children()) - before == {p}
    getattr(p, how)()
    p.join(60)
    assert p.exitcode == -sig
    assert set(mp.active_children()) <= before


def test_subclass_run(pool_context):
    q = pp.Queue()
    p = _Sub(q)
    p._pp_context = pool_context
    p.start()
    assert q.get(timeout=60) == "run " + p.name
    p.join(60)


def test_default_context_rule():
    p = pp.Process(target=_sleep, args=(0,))
    p.start()
    p.join(60)
    assert p._pp_method == mp.get_context().get_start_method()
    assert p._start_method is None   # as multiprocessing.Process: nothing forced on the child


def test_bad_context():
    with pytest.raises(ValueError):
        pp.Process(target=_sleep, context="nonsense")
    with pytest.raises(TypeError):
        pp.Process(target=_sleep, context=3)


_NO_GUARD = '''
import multiprocessing, os, sys
import pyparallel as pp
multiprocessing.set_start_method(sys.argv[1])
print("top level ran in", os.getpid(), flush=True)

K = 10

class Point:                       # a class of __main__, in the arguments
    def __init__(self, x):
        self.x = x

class Worker(pp.Process):          # a subclass of __main__
    def __init__(self, q):
        super().__init__()
        self.q = q
    def run(self):
        self.q.put("subclass ran")

q = pp.Queue()
r, w = pp.Pipe(duplex=False)
arr = pp.Array("d", 3)

def fill(a):                       # a function of __main__ that reads a global
    for i in range(len(a)):
        a[i] = i * K

p = pp.Process(target=lambda q, w, a, pt: (fill(a), w.send(pt.x + 1), q.put(("lambda", K))),
               args=(q, w, arr, Point(41)))
p.start()
got = [q.get(timeout=60), r.recv()]
p.join(60)
s = Worker(q)
s.start()
got.append(q.get(timeout=60))
s.join(60)
print("got", got, list(arr), p.exitcode, s.exitcode, flush=True)
'''


@pytest.mark.parametrize("method", METHODS)
def test_script_without_main_guard_runs_its_top_level_once(tmp_path, method):
    # a lambda target, a pp.Queue, a pp.Pipe, a pp.Array, a class and a subclass of __main__,
    # no `if __name__ == "__main__":` guard: under spawn and forkserver multiprocessing would
    # re-run the script in the child (which fails there: the process is still bootstrapping)
    import subprocess

    script = tmp_path / "no_guard.py"
    script.write_text(_NO_GUARD)
    out = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len([x for x in lines if x.startswith("top level ran in")]) == 1, out.stdout
    assert lines[-1] == "got [('lambda', 10), 42, 'subclass ran'] [0.0, 10.0, 20.0] 0 0", out
