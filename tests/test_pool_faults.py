"""Faults the pool must survive: each case ends in a clear error on its task (or the right
result) and a usable pool, never a hang; nothing is left behind (the no_leaks gate). A
loky-style crash matrix, the defects fault injection found, and the result objects' rules."""
import gc
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time

import _util
import pytest

import pyparallel as pp
from pyparallel._pool.results import ApplyResult, MapResult, ResultCompletedTwice
from pyparallel.pool import (InitializerError, MaybeEncodingError, PoolTerminatedError,
                             WorkerLostError)

pytestmark = pytest.mark.usefixtures("no_leaks")


# ---- the crash matrix: where in a task's life the worker fails ----


def _segv():
    import ctypes
    import faulthandler

    faulthandler.disable()  # a crash on purpose: no dump in the test output
    ctypes.string_at(0)


class CrashOnLoad:
    """Unpickling it in the worker does ``how``."""

    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        return _on_load, (self.how,)


def _on_load(how):
    if how == "raise":
        raise LookupError("cannot load this argument")
    if how == "exit":
        os._exit(3)
    if how == "segv":
        _segv()
    return how


class CrashOnDump:
    """Pickling it (as a result, in the worker) does ``how``."""

    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        if self.how == "raise":
            raise TypeError("cannot pickle this result")
        if self.how == "exit":
            os._exit(4)
        _segv()


class CrashOnDel:
    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        return CrashOnDel, (self.how,)

    def __del__(self):
        # in a worker only (not os.getpid() against a pid taken at import: under spawn and
        # forkserver the worker imports this module itself)
        if multiprocessing.parent_process() is not None and self.how == "exit":
            os._exit(5)


def identity(x):
    return x


def ignore(x):
    return 1


def returns_crash_on_dump(how):
    return CrashOnDump(how)


def run_crash(how):
    if how == "raise":
        raise ValueError("raised while running")
    if how == "exit":
        os._exit(6)
    if how == "segv":
        _segv()
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def _func_that_fails_to_load():
    raise ImportError("this function cannot be loaded in the worker")


class UnloadableFunction:
    def __call__(self, x):
        return x

    def __reduce__(self):
        return _func_that_fails_to_load, ()


MATRIX = [
    ("args-unpickle-raise", lambda p: p.apply(identity, (CrashOnLoad("raise"),)), LookupError),
    ("args-unpickle-exit", lambda p: p.apply(identity, (CrashOnLoad("exit"),)), WorkerLostError),
    ("args-unpickle-segv", lambda p: p.apply(identity, (CrashOnLoad("segv"),)), WorkerLostError),
    ("func-unpickle-raise", lambda p: p.apply(UnloadableFunction(), (1,)), ImportError),
    ("run-raise", lambda p: p.apply(run_crash, ("raise",)), ValueError),
    ("run-exit", lambda p: p.apply(run_crash, ("exit",)), WorkerLostError),
    ("run-segv", lambda p: p.apply(run_crash, ("segv",)), WorkerLostError),
    ("run-kill", lambda p: p.apply(run_crash, ("kill",)), WorkerLostError),
    ("result-pickle-raise", lambda p: p.apply(returns_crash_on_dump, ("raise",)),
     MaybeEncodingError),
    ("result-pickle-exit", lambda p: p.apply(returns_crash_on_dump, ("exit",)), WorkerLostError),
    ("result-pickle-segv", lambda p: p.apply(returns_crash_on_dump, ("segv",)), WorkerLostError),
    ("arg-gc-exit", lambda p: p.apply(ignore, (CrashOnDel("exit"),)), WorkerLostError),
]


@pytest.mark.parametrize("case,call,error", MATRIX, ids=[m[0] for m in MATRIX])
def test_crash_matrix(case, call, error):
    with pp.Pool(1) as p:
        with pytest.raises(error) as info:
            call(p)
        if error is WorkerLostError:
            assert "worker process" in str(info.value)
        assert p.map(abs, [-1, -2, -3]) == [1, 2, 3]  # the pool goes on


def test_arg_gc_crash_fails_that_task_only():
    # The argument is collected before the result is sent: its crash fails that task; the
    # tasks after it run on the replacement.
    with pp.Pool(1) as p:
        rs = [p.apply_async(ignore, (a,)) for a in (1, CrashOnDel("exit"), 3)]
        assert rs[0].get(60) == 1
        with pytest.raises(WorkerLostError):
            rs[1].get(60)
        assert rs[2].get(60) == 1


# ---- defects found by fault injection ----


class ExitsOnUnpickle:
    def __reduce__(self):
        return sys.exit, ("unpickled in the parent",)


def make_exits_on_unpickle(_):
    return ExitsOnUnpickle()


def test_result_whose_unpickling_raises_base_exception():
    with pp.Pool(2) as p:
        for _ in range(5):
            with pytest.raises(SystemExit):
                p.apply(make_exits_on_unpickle, (0,))
            r = p.map_async(make_exits_on_unpickle, range(4), chunksize=1)
            with pytest.raises(SystemExit):
                r.get(30)
        assert p.map(abs, [-7]) == [7]
        assert p._state == "RUN"


def test_callback_raising_base_exception_does_not_kill_the_pool(capsys):
    def cb(_):
        raise SystemExit("from a callback")

    with pp.Pool(1) as p:
        r = p.apply_async(abs, (-2,), callback=cb)
        assert r.get(30) == 2
        assert p.apply(abs, (-3,)) == 3
    assert "from a callback" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["break", "del"])
def test_close_join_after_leaving_imap_early(how):
    # imap is throttled by the caller's progress; once the pool is closed nobody reads on,
    # and the rest runs unthrottled, as every task of a multiprocessing imap is submitted
    p = pp.Pool(2)
    it = p.imap(abs, range(20_000))
    if how == "break":
        for x in it:
            if x == 3:
                break
    else:
        next(it)
        del it
        gc.collect()
    p.close()
    t = threading.Thread(target=p.join, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "join() hung after an abandoned imap"


def init_exit():
    os._exit(9)


def init_segv():
    _segv()


@pytest.mark.parametrize("init", [init_exit, init_segv])
def test_initializer_that_kills_its_worker(init):
    p = pp.Pool(2, initializer=init)
    try:
        with pytest.raises(InitializerError) as info:
            p.map(abs, range(4), chunksize=1)
        assert "died in the pool's initializer" in str(info.value)
        if init is init_exit:
            assert "exited with code 9" in str(info.value)
        else:
            assert ("SIGABRT" if _util.UNDER_ASAN else "SIGSEGV") in str(info.value)
        with pytest.raises(InitializerError):
            p.apply(abs, (1,))
        time.sleep(0.5)
        assert len(p._pool) <= 2  # it stopped starting workers
    finally:
        p.terminate()
        p.join()


def init_raises():
    raise RuntimeError("initializer failed on purpose")


def test_initializer_that_raises():
    with pp.Pool(2, initializer=init_raises) as p:
        with pytest.raises(InitializerError) as info:
            p.map(abs, range(4))
        assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("chunksize", [0, -1])
def test_bad_chunksize_raises_before_work(chunksize):
    with pp.Pool(1) as p:
        for call in (p.map, p.map_async, p.imap, p.imap_unordered):
            with pytest.raises(ValueError, match="Chunksize must be 1"):
                call(abs, [1, 2], chunksize=chunksize)
        for call in (p.starmap, p.starmap_async):
            with pytest.raises(ValueError, match="Chunksize must be 1"):
                call(max, [(1, 2)], chunksize=chunksize)
        assert not p._cache


@pytest.mark.parametrize("make", [pp.Pool, pp.ThreadPool])
@pytest.mark.parametrize("kw", [dict(callback=5), dict(error_callback="print")])
def test_callback_that_cannot_be_called_raises_at_the_call(make, kw):
    # multiprocessing takes it and fails later, in its result thread (printed, or a hang)
    name = next(iter(kw))
    with make(1) as p:
        calls = [lambda: p.apply_async(abs, (-1,), **kw), lambda: p.map_async(abs, [1], **kw),
                 lambda: p.starmap_async(max, [(1, 2)], **kw),
                 lambda: p.apply_async(pp.kernels.fib, (3,), **kw),
                 lambda: p.map_async(pp.kernels.fib, [3], **kw)]
        for call in calls:
            with pytest.raises(TypeError, match=f"^{name} must be callable"):
                call()
        assert not p._cache                    # nothing was submitted
        assert p.apply_async(abs, (-1,), callback=None, error_callback=None).get(60) == 1


def test_callback_that_terminates_keeps_its_own_result():
    got = []
    with pp.Pool(1) as p:
        def cb(value):
            got.append(value)
            p.terminate()

        r = p.apply_async(abs, (-9,), callback=cb)
        assert r.get(30) == 9
        assert got == [9]
        assert p._state == "TERMINATE"


def test_pool_too_big_for_the_machine_fails_at_once():
    t = time.monotonic()
    with pytest.raises(ValueError, match="cannot start 1000000 worker processes"):
        pp.Pool(10**6)
    assert time.monotonic() - t < 120  # hang guard: it must not try to start them


# ---- the result objects ----


def test_a_result_completed_twice_is_detected():
    r = ApplyResult({})
    r._set_chunk(0, 1, True, 1)
    with pytest.raises(ResultCompletedTwice):
        r._set_chunk(0, 1, True, 2)
    assert r.get() == 1
    m = MapResult({}, 4)
    m._set_chunk(0, 2, True, [1, 2])
    with pytest.raises(ResultCompletedTwice):
        m._set_chunk(0, 2, True, [1, 2])
    m._set_chunk(2, 2, True, [3, 4])
    assert m.get() == [1, 2, 3, 4]
    assert m._abort(RuntimeError()) is False  # complete stays complete


def test_successful_before_ready_raises():
    r = ApplyResult({})
    with pytest.raises(ValueError):
        r.successful()
    with pytest.raises(pp.pool.TimeoutError):
        r.get(0.01)
    r._set_chunk(0, 1, False, KeyError("x"))
    assert r.successful() is False
    with pytest.raises(KeyError):
        r.get()


def test_callbacks_run_once_before_get_returns():
    calls = []
    cache = {}
    r = MapResult(cache, 3, callback=calls.append)
    threads = [threading.Thread(target=r._set_chunk, args=(i, 1, True, [i])) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert r.get(1) == [0, 1, 2]
    assert calls == [[0, 1, 2]]
    assert not cache


def test_many_threads_submitting_to_one_pool():
    errors = []
    with pp.Pool(2) as p:
        def client(k):
            try:
                rs = [p.apply_async(pow, (k, i)) for i in range(200)]
                m = p.map(abs, range(-50, 0))
                assert [r.get(60) for r in rs] == [k ** i for i in range(200)]
                assert m == list(range(50, 0, -1))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert not p._cache


def test_terminate_fails_pending_results():
    with pp.Pool(1) as p:
        r = p.apply_async(time.sleep, (30,))
        time.sleep(0.2)
        p.terminate()
        with pytest.raises(PoolTerminatedError):
            r.get(10)


def test_spill_segments_are_evicted_when_over_budget():
    np = pytest.importorskip("numpy")
    from pyparallel._pool.local import spill

    with pp.Pool(1) as p:
        arrays = [np.full(300_000, float(i)) for i in range(12)]  # 2.4 MB each: spilled
        assert p.map(float, [a.sum() for a in arrays]) == [a.sum() for a in arrays]
        sums = p.map(np.sum, arrays, chunksize=1)
        assert sums == [a.sum() for a in arrays]
        pool = p._backend.spills
        assert len(pool.free) <= pool.keep
        assert all(seg.load32(0) != spill.EVICTED for seg in pool.free)


def test_kernels_through_imap_unordered_and_starmap():
    fib = pp.kernels.fib
    with pp.Pool(2) as p:
        xs = list(range(10, 20))
        assert sorted(p.imap_unordered(fib, xs)) == sorted(fib(x) for x in xs)
        assert p.starmap(fib, [(x,) for x in xs]) == [fib(x) for x in xs]
        with pytest.raises(TypeError):
            p.starmap(fib, [(1, 2)])


def test_pickled_pool_is_refused():
    with pp.Pool(1) as p:
        with pytest.raises(NotImplementedError):
            pickle.dumps(p)


def test_terminate_stops_kernels_the_pool_runs():
    p = pp.Pool(2)
    r = p.map_async(pp.kernels.fib, [80] * 4)  # would run for ages
    time.sleep(0.2)
    p.terminate()
    p.join()
    with pytest.raises(PoolTerminatedError):
        r.get(5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            t.name == "pyparallel-kernel" for t in threading.enumerate()):
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "pyparallel-kernel"]


# ---- a forked child never frees what its parent still uses ----

_FORK_CHILD_SCRIPT = """
import gc, multiprocessing, os, sys
import numpy as np
import pyparallel as pp

def big(v):
    return np.full(1 << 18, v, dtype=np.int64)  # 2 MiB: returned through a result segment

held = {}

def child():
    held.clear()  # the child lets go of its copies of the parent's views
    gc.collect()

if __name__ == "__main__":
    ctx, how = sys.argv[1], sys.argv[2]
    with pp.Pool(1, context=ctx) as pool:
        held["kept"] = pool.map(big, [7])[0]
        # a child forked while this process holds views of the segment exits normally:
        # its finalizers and atexit handlers run
        if how == "os.fork":
            pid = os.fork()
            if pid == 0:
                child()
                sys.exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        else:
            p = multiprocessing.get_context("fork").Process(target=child)
            p.start()
            p.join()
            assert p.exitcode == 0
        later = pool.map(big, [9])[0]  # the same worker writes its next big result
        assert int(later[0]) == 9 and int(later[-1]) == 9
        kept = held["kept"]
        print(int(kept.min()), int(kept.max()))
"""


@pytest.mark.parametrize("how", ["os.fork", "mp-fork-process"])
def test_forked_child_does_not_free_the_parents_result_segment(pool_context, how, tmp_path):
    pytest.importorskip("numpy")
    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_CHILD_SCRIPT)
    import subprocess

    out = subprocess.run([sys.executable, str(script), pool_context, how], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["7", "7"], "the kept result was overwritten"
