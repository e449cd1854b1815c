"""pyparallel.ProcessPoolExecutor: the concurrent.futures API on pyparallel's pool."""
import concurrent.futures as cf
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

import pyparallel as pp
from pyparallel.futures import BrokenWorkerError, InitializerFailedError
from pyparallel.pool import InitializerError, WorkerLostError


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail_on(x, bad=7):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def raise_value_error(msg):
    raise ValueError(msg)


def do_exit(code):
    raise SystemExit(code)


def die(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)
    time.sleep(10)


def wait_for_file(path, limit=20.0):
    end = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise RuntimeError("the test's file never appeared")
        time.sleep(0.005)
    return os.getpid()


_state = {}


def set_state(value):
    _state["value"] = value


def get_state():
    return _state.get("value")


def bad_init():
    raise RuntimeError("initializer went wrong")


@pytest.fixture
def gate(tmp_path):
    """A file-based gate: tasks that wait_for_file(path) block until open() is called."""
    path = str(tmp_path / "gate")

    class Gate:
        def __init__(self):
            self.path = path

        def open(self):
            with open(path, "w"):
                pass

    g = Gate()
    yield g
    g.open()


@pytest.fixture
def ex():
    e = pp.ProcessPoolExecutor(2)
    yield e
    e.shutdown(wait=True, cancel_futures=True)


# ---- submit and futures -------------------------------------------------------------------


def test_submit_returns_a_real_future(ex):
    f = ex.submit(square, 12)
    assert isinstance(f, cf.Future)
    assert f.result(timeout=30) == 144
    assert f.done() and not f.cancelled()


def test_submit_kwargs_and_lambda(ex):
    assert ex.submit(add, 2, b=3).result(30) == 5
    k = 10
    assert ex.submit(lambda x: x + k, 5).result(30) == 15


def test_exception_carries_remote_traceback(ex):
    f = ex.submit(raise_value_error, "from the worker")
    with pytest.raises(ValueError, match="from the worker") as info:
        f.result(30)
    cause = info.value.__cause__
    assert isinstance(cause, cf.process._RemoteTraceback)
    assert "raise_value_error" in str(cause) and "from the worker" in str(cause)
    assert isinstance(f.exception(), ValueError)


def test_base_exception_comes_back_as_in_the_stdlib(ex):
    f = ex.submit(do_exit, 3)
    exc = f.exception(30)
    assert isinstance(exc, SystemExit) and exc.code == 3
    assert ex.submit(square, 3).result(30) == 9  # the worker did not exit


def test_as_completed_wait_and_callbacks(ex):
    fs = [ex.submit(square, i) for i in range(20)]
    seen = []
    lock = threading.Lock()

    def cb(fut):
        with lock:
            seen.append(fut.result())

    for f in fs:
        f.add_done_callback(cb)
    got = sorted(f.result() for f in cf.as_completed(fs, timeout=30))
    assert got == [i * i for i in range(20)]
    done, not_done = cf.wait(fs, timeout=30)
    assert len(done) == 20 and not not_done
    deadline = time.monotonic() + 10
    while len(seen) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(seen) == got


def test_wait_first_completed(ex, gate):
    slow = ex.submit(wait_for_file, gate.path)
    fast = ex.submit(square, 2)
    done, not_done = cf.wait([slow, fast], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert fast in done and slow in not_done
    gate.open()
    assert isinstance(slow.result(30), int)


def test_queued_futures_can_be_cancelled(gate):
    ex = pp.ProcessPoolExecutor(1)
    try:
        running = ex.submit(wait_for_file, gate.path)
        rest = [ex.submit(square, i) for i in range(10)]
        # At most 2 * max_workers calls are handed to the pool; the others wait here.
        cancelled = [f.cancel() for f in rest]
        assert cancelled[2:] == [True] * 8
        assert not running.cancel()
        gate.open()
        assert isinstance(running.result(30), int)
        for f, c in zip(rest, cancelled):
            if c:
                assert f.cancelled()
                with pytest.raises(cf.CancelledError):
                    f.result(0)
            else:
                assert f.result(30) == rest.index(f) ** 2
    finally:
        ex.shutdown()


def test_shutdown_waits_for_everything_submitted(gate):
    ex = pp.ProcessPoolExecutor(2)
    fs = [ex.submit(square, i) for i in range(50)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in fs)
    assert [f.result() for f in fs] == [i * i for i in range(50)]
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(square, 1)


def test_shutdown_cancel_futures(gate):
    ex = pp.ProcessPoolExecutor(1)
    first = ex.submit(wait_for_file, gate.path)
    rest = [ex.submit(square, i) for i in range(10)]
    threading.Timer(0.3, gate.open).start()
    ex.shutdown(wait=True, cancel_futures=True)
    assert isinstance(first.result(0), int)
    cancelled = [f for f in rest if f.cancelled()]
    assert len(cancelled) >= 8  # everything not yet handed to the pool
    assert all(f.done() for f in rest)
    for f in rest:
        if not f.cancelled():
            assert f.result(0) == rest.index(f) ** 2


def test_shutdown_without_wait_still_completes(gate):
    ex = pp.ProcessPoolExecutor(2)
    fs = [ex.submit(wait_for_file, gate.path) for _ in range(3)]
    ex.shutdown(wait=False)
    assert not any(f.done() for f in fs)
    gate.open()
    assert all(isinstance(f.result(30), int) for f in fs)


def test_context_manager_shuts_down():
    with pp.ProcessPoolExecutor(2) as ex:
        f = ex.submit(square, 5)
    assert f.done() and f.result() == 25
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_unpicklable_argument_fails_the_future(ex):
    f = ex.submit(square, threading.Lock())
    with pytest.raises(TypeError, match="pickle"):
        f.result(30)
    assert ex.submit(square, 4).result(30) == 16


# ---- map ---------------------------------------------------------------------------------


def test_map_matches_builtin_map(ex):
    assert list(ex.map(square, range(1000))) == [i * i for i in range(1000)]
    assert list(ex.map(add, range(10), range(100, 110))) == [100 + 2 * i for i in range(10)]
    assert list(ex.map(square, [])) == []


@pytest.mark.parametrize("chunksize", [1, 3, 50])
def test_map_chunksize(ex, chunksize):
    assert list(ex.map(square, range(101), chunksize=chunksize)) == [i * i for i in range(101)]


def test_map_error_after_the_items_before_it(ex):
    it = ex.map(fail_on, range(20))
    got = []
    with pytest.raises(ValueError, match="bad item 7") as info:
        for x in it:
            got.append(x)
    assert got == list(range(7))
    assert isinstance(info.value.__cause__, cf.process._RemoteTraceback)


def test_map_error_with_chunks_fails_the_chunk(ex):
    got = []
    with pytest.raises(ValueError, match="bad item 7"):
        for x in ex.map(fail_on, range(20), chunksize=5):
            got.append(x)
    assert got == list(range(5))  # the chunk holding 5..9 failed as one, as in the stdlib


def test_map_timeout(ex, gate):
    it = ex.map(wait_for_file, [gate.path] * 3, timeout=0.3)
    with pytest.raises(TimeoutError):
        list(it)
    gate.open()


def test_map_buffersize_bounds_what_is_submitted(ex):
    consumed = []

    def source():
        for i in itertools.count():
            consumed.append(i)
            yield i

    it = ex.map(square, source(), buffersize=4)
    assert len(consumed) == 4  # submitted ahead, before the first result is asked for
    first = list(itertools.islice(it, 10))
    assert first == [i * i for i in range(10)]
    assert len(consumed) <= 10 + 4 + 1
    it.close()


def test_map_bad_arguments(ex):
    with pytest.raises(ValueError, match="chunksize"):
        ex.map(square, range(3), chunksize=0)
    with pytest.raises(TypeError, match="buffersize"):
        ex.map(square, range(3), buffersize=2.0)
    with pytest.raises(ValueError, match="buffersize"):
        ex.map(square, range(3), buffersize=0)
    with pytest.raises(TypeError):
        ex.map(square, 5)


def test_map_closed_early_cancels_the_rest(gate):
    ex = pp.ProcessPoolExecutor(1)
    try:
        it = ex.map(wait_for_file, [gate.path] * 40, chunksize=1, buffersize=None)
        threading.Timer(0.2, gate.open).start()
        assert isinstance(next(it), int)
        it.close()
        ex.shutdown(wait=True)
    finally:
        gate.open()


# ---- initializer, worker death, arguments -------------------------------------------------


def test_initializer_runs_in_each_worker():
    with pp.ProcessPoolExecutor(2, initializer=set_state, initargs=("ready",)) as ex:
        assert {ex.submit(get_state).result(30) for _ in range(10)} == {"ready"}


def test_initializer_failure_breaks_the_executor():
    ex = pp.ProcessPoolExecutor(2, initializer=bad_init)
    try:
        f = ex.submit(square, 2)
        with pytest.raises(BrokenProcessPool) as info:
            f.result(30)
        assert isinstance(info.value, InitializerFailedError)
        assert isinstance(info.value, InitializerError)
        assert "initializer went wrong" in str(info.value)
        with pytest.raises(BrokenProcessPool):
            ex.submit(square, 3).result(30)
    finally:
        ex.shutdown()


@pytest.mark.parametrize("reuse", [True, False])
def test_worker_death_fails_only_that_future(reuse):
    with pp.ProcessPoolExecutor(2, reuse=reuse) as ex:
        pid = ex.submit(os.getpid).result(30)
        others = [ex.submit(square, i) for i in range(20)]
        f = ex.submit(die)
        with pytest.raises(BrokenProcessPool) as info:
            f.result(30)
        err = info.value
        assert isinstance(err, BrokenWorkerError) and isinstance(err, WorkerLostError)
        assert "SIGKILL" in str(err) and "worker process" in str(err)
        assert [g.result(30) for g in others] == [i * i for i in range(20)]
        # the executor goes on
        assert list(ex.map(square, range(30))) == [i * i for i in range(30)]
        assert isinstance(pid, int)


def test_bad_arguments_raise_before_anything_starts():
    with pytest.raises(ValueError, match="max_workers"):
        pp.ProcessPoolExecutor(0)
    with pytest.raises(TypeError, match="initializer"):
        pp.ProcessPoolExecutor(2, initializer=5)
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        pp.ProcessPoolExecutor(2, max_tasks_per_child=0)
    with pytest.raises(TypeError, match="max_tasks_per_child"):
        pp.ProcessPoolExecutor(2, max_tasks_per_child="3")
    with pytest.raises(ValueError, match="fork"):
        pp.ProcessPoolExecutor(2, mp_context=cf.process.mp.get_context("fork"),
                               max_tasks_per_child=2)


def test_max_tasks_per_child_replaces_workers():
    with pp.ProcessPoolExecutor(1, max_tasks_per_child=1, reuse=False,
                                mp_context="forkserver") as ex:
        pids = [ex.submit(os.getpid).result(30) for _ in range(3)]
    assert len(set(pids)) == 3


def test_private_workers_exit_at_shutdown():
    ex = pp.ProcessPoolExecutor(2, reuse=False)
    pids = {ex.submit(wait_then_pid, 0.05).result(30) for _ in range(6)}
    ex.shutdown(wait=True)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def wait_then_pid(t):
    time.sleep(t)
    return os.getpid()


def test_executors_with_the_same_arguments_share_warm_workers():
    with pp.ProcessPoolExecutor(2) as a:
        pids_a = {a.submit(wait_then_pid, 0.05).result(30) for _ in range(8)}
    with pp.ProcessPoolExecutor(2) as b:
        pids_b = {b.submit(wait_then_pid, 0.05).result(30) for _ in range(8)}
    assert pids_b <= pids_a
    with pp.ProcessPoolExecutor(2, reuse=False) as c:
        pids_c = {c.submit(wait_then_pid, 0.05).result(30) for _ in range(8)}
    assert not (pids_c & pids_a)


def test_a_second_executor_with_other_arguments_leaves_the_first_working():
    a = pp.ProcessPoolExecutor(2)
    try:
        assert a.submit(square, 2).result(30) == 4
        with pp.ProcessPoolExecutor(3) as b:  # replaces the shared pool
            assert b.submit(square, 3).result(30) == 9
            assert a.submit(square, 4).result(30) == 16  # a still holds its pool
    finally:
        a.shutdown()


@pytest.mark.parametrize("reuse", [True, False])
def test_start_methods(pool_context, reuse):
    with pp.ProcessPoolExecutor(2, mp_context=pool_context, reuse=reuse) as ex:
        assert ex.submit(square, 9).result(60) == 81
        assert list(ex.map(square, range(40))) == [i * i for i in range(40)]
        with pytest.raises(ValueError):
            ex.submit(raise_value_error, "x").result(60)


# ---- done-callbacks, re-entrant shutdown, interrupted waits (issue 26) ----------------------


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


def _run_fresh(tmp_path, body, *args, limit=90):
    """``body`` as a script in a fresh interpreter (argv: ``args``), in a process group of
    its own; a hang fails the test at ``limit`` seconds, with the group killed (its workers
    too, which would hold the output pipes open)."""
    script = tmp_path / "case.py"
    script.write_text(body)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        pytest.fail(f"hung (no exit in {limit} s): {out!r} {err!r}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


CALLBACK_RAISES = """
import sys
import pyparallel as pp

exc = {"SystemExit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt}[sys.argv[2]]

def boom(f):
    raise exc("raised by a done-callback")

if __name__ == "__main__":
    ex = pp.ProcessPoolExecutor(2, mp_context=sys.argv[1])
    f = ex.submit(abs, -1)
    f.add_done_callback(boom)
    assert f.result(timeout=60) == 1
    assert ex.submit(abs, -2).result(timeout=60) == 2  # later futures work
    ex.shutdown(wait=True)
    print("shut down", flush=True)
    # and the interpreter exits with an executor whose callback raised, never shut down
    ex2 = pp.ProcessPoolExecutor(2, mp_context=sys.argv[1], reuse=False)
    g = ex2.submit(abs, -3)
    g.add_done_callback(boom)
    assert g.result(timeout=60) == 3
    ex2.submit(abs, -4)
"""


@pytest.mark.parametrize("exc", ["SystemExit", "KeyboardInterrupt"])
def test_callback_raising_base_exception_never_wedges_shutdown_or_exit(
        tmp_path, pool_context, exc):
    out = _run_fresh(tmp_path, CALLBACK_RAISES, pool_context, exc)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "shut down", out.stderr
    # reported as the stdlib reports an Exception from a callback
    assert "exception calling callback for" in out.stderr
    assert f"{exc}: raised by a done-callback" in out.stderr


CALLBACK_SHUTS_DOWN = """
import sys, threading
import pyparallel as pp

if __name__ == "__main__":
    ex = pp.ProcessPoolExecutor(2, mp_context=sys.argv[1])
    got = []
    called = threading.Event()

    def cb(f):
        try:
            ex.shutdown(wait=True)
        except BaseException as e:
            got.append(e)
        called.set()

    f = ex.submit(abs, -1)
    f.add_done_callback(cb)
    assert f.result(timeout=60) == 1
    assert called.wait(60), "the callback never ran to its end"
    assert len(got) == 1 and type(got[0]) is RuntimeError, got
    assert str(got[0]) == "cannot join current thread", got
    try:
        ex.submit(abs, 1)  # shut down all the same, as the stdlib's
    except RuntimeError as e:
        assert "after shutdown" in str(e)
    else:
        raise AssertionError("submit after shutdown")
    ex.shutdown(wait=True)
    # the process's warm pool goes on
    with pp.ProcessPoolExecutor(2, mp_context=sys.argv[1]) as other:
        assert other.submit(abs, -5).result(timeout=60) == 5
    assert pp.get_reusable_pool(2, context=sys.argv[1]).map(abs, [-1, -2]) == [1, 2]
    print("ok", flush=True)
"""


def test_callback_calling_shutdown_wait_raises_as_the_stdlib(tmp_path, pool_context):
    out = _run_fresh(tmp_path, CALLBACK_SHUTS_DOWN, pool_context)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok", out.stderr


def test_callback_waiting_on_another_future_never_blocks_its_delivery(pool_context):
    with pp.ProcessPoolExecutor(2, mp_context=pool_context) as ex:
        got = []
        lock = threading.Lock()
        ran = threading.Semaphore(0)
        for i in range(10):
            first = ex.submit(abs, -i)
            later = ex.submit(sleep_then, i, 0.05)

            def cb(_, later=later):
                try:
                    value = later.result(timeout=30)
                except BaseException as e:  # noqa: BLE001 - reported by the assert below
                    value = e
                with lock:
                    got.append(value)
                ran.release()

            first.add_done_callback(cb)
        for _ in range(10):
            assert ran.acquire(timeout=90), "a callback never ran"
        assert sorted(got, key=repr) == list(range(10)), got


INTERRUPTED_WAIT = """
import os, signal, sys, threading, time
import pyparallel as pp

def slow(x):
    time.sleep(2.0)
    return x

if __name__ == "__main__":
    with pp.ProcessPoolExecutor(2, mp_context=sys.argv[1]) as ex:
        assert ex.submit(abs, -1).result(timeout=60) == 1  # the workers are up
        f = ex.submit(slow, 42)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            f.result(timeout=60)
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("the wait was not interrupted")
        assert not f.cancelled()
        assert f.result(timeout=60) == 42  # the call went on and completed
    print("ok", flush=True)
"""


def test_ctrl_c_in_result_interrupts_the_wait_only(tmp_path, pool_context):
    out = _run_fresh(tmp_path, INTERRUPTED_WAIT, pool_context)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok", out.stderr
