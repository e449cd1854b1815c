"""ProcessPoolExecutor.terminate_workers() and kill_workers() (Python 3.14's API, on every
version): as the stdlib's, the executor shuts down (held calls cancelled, later submits
refused) and the workers running its calls get SIGTERM or SIGKILL; as pyparallel's, each
stopped worker fails only the future it was running (BrokenWorkerError), calls not started
fail with BrokenProcessPool, and on the shared pool the other executors go on."""
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

import pyparallel as pp
from pyparallel import _reuse
from pyparallel.futures import BrokenWorkerError



@pytest.fixture(autouse=True)
def shared_pool_stopped(no_leaks):
    """The shared pool these executors ran on is stopped before no_leaks looks."""
    yield
    _reuse._registry.shutdown()


def started_then_wait(marks, gate, limit=60.0):
    """Leaves a file named by its pid in `marks`, then waits for `gate` to exist."""
    with open(os.path.join(marks, str(os.getpid())), "w"):
        pass
    end = time.monotonic() + limit
    while not os.path.exists(gate) and time.monotonic() < end:
        time.sleep(0.005)
    return os.getpid()


def square(x):
    return x * x


def _wait_for(predicate, what, limit=60.0):
    end = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < end, what
        time.sleep(0.01)


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("stop,sig", [("terminate_workers", signal.SIGTERM),
                                      ("kill_workers", signal.SIGKILL)])
def test_stop_workers(tmp_path, pool_context, reuse, stop, sig):
    marks = tmp_path / "marks"
    marks.mkdir()
    gate = str(tmp_path / "gate")
    ex = pp.ProcessPoolExecutor(2, mp_context=pool_context, reuse=reuse)
    try:
        running = [ex.submit(started_then_wait, str(marks), gate) for _ in range(2)]
        _wait_for(lambda: len(os.listdir(marks)) == 2, "the two calls never started")
        pids = [int(p) for p in os.listdir(marks)]
        queued = [ex.submit(started_then_wait, str(marks), gate) for _ in range(2)]  # in the pool
        held = [ex.submit(square, i) for i in range(3)]  # beyond 2 per worker: in the executor
        getattr(ex, stop)()
        for f in running:
            with pytest.raises(BrokenWorkerError, match=sig.name):
                f.result(60)
        for f in queued:
            with pytest.raises(BrokenProcessPool) as info:
                f.result(60)
            assert not isinstance(info.value, BrokenWorkerError)
        assert all(f.cancelled() for f in held)
        assert sorted(os.listdir(marks)) == sorted(map(str, pids))  # nothing else ran
        with pytest.raises(RuntimeError):
            ex.submit(square, 2)
        _wait_for(lambda: all(_gone(p) for p in pids), "a stopped worker is still there")
        # the shared pool goes on for the next executor
        with pp.ProcessPoolExecutor(2, mp_context=pool_context, reuse=reuse) as other:
            assert list(other.map(square, range(5))) == [0, 1, 4, 9, 16]
    finally:
        open(gate, "w").close()
        ex.shutdown(wait=True)


@pytest.mark.parametrize("stop", ["terminate_workers", "kill_workers"])
def test_stop_workers_leaves_other_executors_calls_alone(tmp_path, stop):
    # two executors on the one shared pool: stopping one's workers fails only its calls
    marks = tmp_path / "marks"
    marks.mkdir()
    gate = str(tmp_path / "gate")
    a = pp.ProcessPoolExecutor(3)
    b = pp.ProcessPoolExecutor(3)
    try:
        theirs = b.submit(started_then_wait, str(marks), gate)
        _wait_for(lambda: len(os.listdir(marks)) == 1, "b's call never started")
        mine = [a.submit(started_then_wait, str(marks), gate) for _ in range(2)]
        _wait_for(lambda: len(os.listdir(marks)) == 3, "a's calls never started")
        getattr(a, stop)()
        for f in mine:
            with pytest.raises(BrokenWorkerError):
                f.result(60)
        assert not theirs.done()
        open(gate, "w").close()
        assert theirs.result(60) > 0
        assert list(b.map(square, range(4))) == [0, 1, 4, 9]
    finally:
        open(gate, "w").close()
        a.shutdown(wait=True)
        b.shutdown(wait=True)


def test_stop_workers_of_an_idle_or_shut_down_executor():
    with pp.ProcessPoolExecutor(2, reuse=False) as ex:
        assert ex.submit(square, 3).result(60) == 9
        ex.kill_workers()
        ex.kill_workers()  # again: nothing to stop
        with pytest.raises(RuntimeError):
            ex.submit(square, 2)
