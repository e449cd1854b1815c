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
