"""pyparallel.Pool against multiprocessing.Pool's documented behaviour, plus the faults
multiprocessing does not survive (a worker killed mid-task, Ctrl-C, unpicklable objects).

Small pools, small inputs: the core API runs under fork, forkserver and spawn through the
``pool_context`` fixture; the rest runs under the default start method."""
import gc
import itertools
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.pool
import multiprocessing.resource_tracker
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import pyparallel
from _util import memfd_count
from conftest import _children
from pyparallel import Pool, ThreadPool
from pyparallel.pool import (
    InitializerError,
    PoolTerminatedError,
    WorkerLostError,
    default_start_method,
)

# ---- task functions (module level: importable under spawn) ----


def square(x):
    return x * x


def add(a, b):
    return a + b


def boom(x):
    if x == 3:
        raise ZeroDivisionError(f"boom {x}")
    return x


def sleepy(x):
    time.sleep(x)
    return x


def getpid(_=None):
    return os.getpid()


def suicide(x):
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
    return x


def exit_hard(x):
    if x == 2:
        os._exit(7)
    return x


def segfault(x):
    if x == 1:
        import ctypes
        import faulthandler

        faulthandler.disable()  # a crash on purpose: no dump in the test output
        ctypes.string_at(0)
    return x


def unpicklable_result(x):
    if x == 2:
        return threading.Lock()
    return x


_initialized = None


def init_global(value):
    global _initialized
    _initialized = value


def read_global(_):
    return _initialized


def init_fail():
    raise RuntimeError("initializer failed on purpose")


def array_sum(a):
    return float(a.sum())


def echo(x):
    return x


pytestmark = pytest.mark.usefixtures("no_leaks")


def test_map_and_friends(pool_context):
    with Pool(2, context=pool_context) as p:
        assert p.map(square, range(100)) == [x * x for x in range(100)]
        assert p.map(square, []) == []
        assert p.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert p.apply(add, (1,), {"b": 5}) == 6
        assert list(p.imap(square, range(20))) == [x * x for x in range(20)]
        assert list(p.imap(square, range(20), chunksize=3)) == [x * x for x in range(20)]
        assert sorted(p.imap_unordered(square, range(20))) == [x * x for x in range(20)]
        assert p.apply_async(square, (7,)).get(timeout=30) == 49


def whoami(_=None):
    me, parent = multiprocessing.current_process(), multiprocessing.parent_process()
    return me.name, me.daemon, me.pid == os.getpid(), parent.pid, parent.is_alive()


def test_worker_identity(pool_context):
    """What a task sees of multiprocessing in a worker, as in a multiprocessing.Pool worker."""
    with Pool(2, context=pool_context) as p:
        seen = p.map(whoami, range(4), chunksize=1)
    for name, daemon, own_pid, parent_pid, parent_alive in seen:
        assert name.startswith("PyParallelPoolWorker-") and daemon and own_pid
        assert parent_pid == os.getpid() and parent_alive


_queue = None


def put_on_inherited_queue(x):
    _queue.put(x)
    return x


def test_inherited_queue_is_flushed_when_workers_exit():
    """A multiprocessing.Queue inherited by fork workers: its feeder thread's last items
    reach the parent, because a worker's exit runs multiprocessing's finalizers."""
    global _queue
    _queue = multiprocessing.get_context("fork").Queue()
    try:
        p = Pool(2, context="fork")
        p.map(put_on_inherited_queue, range(200), chunksize=10)
        p.close()
        p.join()
        got = sorted(_queue.get(timeout=10) for _ in range(200))
        assert got == list(range(200))
    finally:
        _queue.close()
        _queue.join_thread()
        _queue = None


def test_lambdas_and_closures(pool_context):
    k = 3
    with Pool(2, context=pool_context) as p:
        assert p.map(lambda x: x + k, range(5)) == [3, 4, 5, 6, 7]
        assert p.apply(lambda: k * 2) == 6


def test_worker_killed_mid_map_recovers(pool_context):
    with Pool(2, context=pool_context) as p:
        with pytest.raises(WorkerLostError, match="SIGKILL"):
            p.map(suicide, range(10), chunksize=1)
        # the replacement works and the pool goes on
        assert p.map(square, range(10)) == [x * x for x in range(10)]
        it = p.imap(suicide, range(10))
        got = []
        for _ in range(10):
            try:
                got.append(next(it))
            except WorkerLostError:
                got.append("lost")
        assert got == [0, 1, 2, 3, 4, "lost", 6, 7, 8, 9]


# ---- results, exceptions, semantics, compared with multiprocessing ----


def test_exception_type_and_remote_traceback():
    with Pool(2) as p:
        with pytest.raises(ZeroDivisionError, match="boom 3") as ei:
            p.map(boom, range(6))
        assert isinstance(ei.value.__cause__, multiprocessing.pool.RemoteTraceback)
        assert "boom" in str(ei.value.__cause__)
        r = p.apply_async(boom, (3,))
        r.wait(30)
        assert r.ready() and not r.successful()
        with pytest.raises(ZeroDivisionError):
            r.get()


@pytest.mark.parametrize("n", [0, 1, 7, 100, 1001])
@pytest.mark.parametrize("procs", [1, 2, 3])
def test_default_chunksize_matches_stdlib(n, procs):
    with multiprocessing.pool.ThreadPool(procs) as ref:
        expected = ref.map_async(echo, range(n))._chunksize
    with Pool(procs) as p:
        r = p.map_async(echo, range(n))
        assert r._chunksize == expected
        assert r.get(30) == list(range(n))


def test_async_result_behaviour():
    with Pool(2) as p:
        r = p.apply_async(sleepy, (2,))     # long enough to be seen running on a busy machine
        assert not r.ready()
        with pytest.raises(ValueError):
            r.successful()
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(timeout=0.01)
        r.wait(0.01)
        assert r.get(timeout=60) == 2
        assert r.ready() and r.successful()
        assert isinstance(r, multiprocessing.pool.AsyncResult)


def test_imap_next_timeout():
    with Pool(2) as p:
        it = p.imap(sleepy, [2, 0])         # long enough to be seen running on a busy machine
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.01)
        assert it.next(timeout=60) == 2
        assert it.next(timeout=30) == 0
        with pytest.raises(StopIteration):
            it.next(timeout=30)


def test_callbacks_and_error_callbacks():
    got, errs = [], []
    with Pool(2) as p:
        p.map_async(square, range(5), callback=got.append).wait(30)
        p.apply_async(boom, (3,), error_callback=errs.append).wait(30)
        p.starmap_async(add, [(1, 1)], callback=got.append).wait(30)
        r = p.map_async(boom, range(5), error_callback=errs.append)
        r.wait(30)
    assert got == [[0, 1, 4, 9, 16], [2]]
    assert [type(e) for e in errs] == [ZeroDivisionError, ZeroDivisionError]


def test_exception_in_callback_does_not_break_pool(capfd):
    def bad_callback(_):
        raise RuntimeError("callback failed")

    with Pool(2) as p:
        r = p.apply_async(square, (3,), callback=bad_callback)
        assert r.get(30) == 9
        r = p.apply_async(boom, (3,), error_callback=bad_callback)
        with pytest.raises(ZeroDivisionError):
            r.get(30)
        assert p.map(square, range(4)) == [0, 1, 4, 9]
    assert "callback failed" in capfd.readouterr().err


def test_state_rules():
    with pytest.raises(ValueError):
        Pool(0)
    with pytest.raises(ValueError):
        Pool(-1)
    with pytest.raises(ValueError):
        Pool(1, maxtasksperchild=0)
    with pytest.raises(TypeError):
        Pool(1, initializer=3)
    p = Pool(2)
    with pytest.raises(ValueError, match="still running"):
        p.join()
    with pytest.raises(NotImplementedError):
        pickle.dumps(p)
    p.close()
    for call in (lambda: p.map(square, [1]), lambda: p.apply(square, (1,)),
                 lambda: p.imap(square, [1]), lambda: p.apply_async(square, (1,)),
                 lambda: p.starmap(add, [(1, 2)]), lambda: p.imap_unordered(square, [1])):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    p.join()
    with pytest.raises(ValueError):
        with p:
            pass
    with pytest.raises(ValueError, match="Chunksize"):
        with Pool(1) as q:
            q.imap(square, [1], chunksize=0)


def test_close_join_completes_pending_work():
    p = Pool(2)
    r = p.map_async(sleepy, [0.1] * 4, chunksize=1)
    p.close()
    p.join()
    assert r.get(0) == [0.1] * 4


def test_context_manager_terminates():
    with Pool(2) as p:
        pids = set(p.map(getpid, range(4), chunksize=1))
    assert p._state == "TERMINATE"
    time.sleep(0.1)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_maxtasksperchild_recycles_workers():
    with Pool(2, maxtasksperchild=2) as p:
        pids = p.map(getpid, range(12), chunksize=1)
        assert len(set(pids)) >= 4
        assert p.map(square, range(10)) == [x * x for x in range(10)]


def test_initializer():
    with Pool(2, initializer=init_global, initargs=(42,)) as p:
        assert p.map(read_global, range(4)) == [42] * 4


def test_initializer_exception_fails_tasks_does_not_hang():
    with Pool(2, initializer=init_fail) as p:
        with pytest.raises(InitializerError) as ei:
            p.map(square, range(4))
        assert "initializer failed on purpose" in str(ei.value)


def test_unpicklable_arguments_raise_in_caller():
    with Pool(2) as p:
        lock = threading.Lock()
        with pytest.raises(TypeError):
            p.map(echo, [1, lock])
        with pytest.raises(TypeError):
            p.apply_async(echo, (lock,))
        with pytest.raises(TypeError):
            list(p.imap(echo, [lock]))
        assert p.map(square, [2]) == [4]
        assert not p._cache


def test_unpicklable_result_is_maybe_encoding_error_for_that_task_only():
    with Pool(2) as p:
        rs = [p.apply_async(unpicklable_result, (i,)) for i in range(4)]
        assert rs[0].get(30) == 0
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            rs[2].get(30)
        assert rs[3].get(30) == 3
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            p.map(unpicklable_result, range(4))


# Under AddressSanitizer (make asan) a segfault is reported by ASan, which then aborts.
_SEGV = "SIGSEGV|SIGABRT" if "asan" in os.environ.get("LD_PRELOAD", "") else "SIGSEGV"


@pytest.mark.parametrize("fn,what", [(exit_hard, "exited with code 7"), (segfault, _SEGV)])
def test_worker_crash_names_cause(fn, what):
    with Pool(2) as p:
        with pytest.raises(WorkerLostError, match=what):
            p.map(fn, range(4), chunksize=1)
        assert p.apply(square, (5,)) == 25


def mark_then_sleep(arg):
    """Leaves a file named by its pid in the directory, then sleeps."""
    where, t = arg
    open(os.path.join(where, str(os.getpid())), "w").close()
    time.sleep(t)
    return t


def test_external_kill_during_map(tmp_path):
    with Pool(2) as p:
        pids = [w.pid for w in p._pool]
        r = p.map_async(mark_then_sleep, [(str(tmp_path), 1.0)] * 4, chunksize=1)
        end = time.monotonic() + 60  # the worker is running a task (hang guard)
        while not (tmp_path / str(pids[0])).exists() and time.monotonic() < end:
            time.sleep(0.005)
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(WorkerLostError, match=str(pids[0])):
            r.get(30)
        assert p.map(square, range(3)) == [0, 1, 4]


def test_terminate_during_map_fails_pending_no_hang():
    p = Pool(2)
    r = p.map_async(sleepy, [0.5] * 8, chunksize=1)
    it = p.imap(sleepy, [0.5] * 8)
    time.sleep(0.1)
    p.terminate()
    with pytest.raises(PoolTerminatedError):
        r.get(10)
    with pytest.raises(PoolTerminatedError):
        list(it)
    p.join()


def test_gc_of_running_pool_warns_and_reaps():
    p = Pool(2)
    pids = [w.pid for w in p._pool]
    with pytest.warns(ResourceWarning):
        del p
        gc.collect()
    time.sleep(0.2)
    assert not set(pids) & set(_children())


_kept = []


def keep_and_sum(a):
    """Keeps a view of its argument in the worker, then reports the sums of all it kept."""
    _kept.append(a)
    return [float(k.sum()) for k in _kept]


def test_spilled_arguments_kept_by_a_task_are_not_overwritten(pool_context):
    """Big arguments come through shared segments that are reused from task to task; one
    that a task still references is never written again."""
    np = pytest.importorskip("numpy")
    arrays = [np.full(1 << 18, i, dtype=np.float64) for i in range(12)]  # 2 MiB each
    before = memfd_count()
    with Pool(1, context=pool_context) as p:
        got = [p.apply(keep_and_sum, (a,)) for a in arrays]
        # later ones (not kept, sent through one segment) keep flowing correctly
        for i in range(20):
            a = np.full(1 << 18, 100 + i, dtype=np.float64)
            assert p.apply(array_sum, (a,)) == float(a.sum())
        final = p.apply(keep_and_sum, (arrays[0],))
    sums = [float(a.sum()) for a in arrays]
    assert got[-1] == sums
    assert final == sums + [sums[0]]
    assert memfd_count() == before, "spill segments left open"


def sum_after_start(a, flag=None):
    if flag is not None:
        open(flag, "w").close()  # the test kills this worker now: it is running this task
        time.sleep(60)
    return float(a.sum())


def test_spilled_task_of_a_killed_worker_is_resent(tmp_path):
    """The task the killed worker was running fails; the spilled task queued behind it in
    the same worker's ring is resent and completes."""
    np = pytest.importorskip("numpy")
    arrays = [np.full(1 << 18, i, dtype=np.float64) for i in range(6)]  # 2 MiB: spilled
    flag = str(tmp_path / "started")
    with Pool(2) as p:
        victim = p._pool[0].pid
        rs = [p.apply_async(sum_after_start, (arrays[0], flag))]
        rs += [p.apply_async(sum_after_start, (a,)) for a in arrays[1:]]
        deadline = time.monotonic() + 30
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(flag)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerLostError, match=f"worker process {victim} was killed"):
            rs[0].get(30)
        assert [r.get(30) for r in rs[1:]] == [float(a.sum()) for a in arrays[1:]]


def test_big_arguments_and_results():
    np = pytest.importorskip("numpy")
    arrays = [np.full(1 << 19, i, dtype=np.float64) for i in range(6)]  # 4 MiB each
    with Pool(2) as p:
        assert p.map(array_sum, arrays, chunksize=1) == [float(a.sum()) for a in arrays]
        big = b"x" * (20 << 20)  # larger than a ring: streamed both ways
        assert p.apply(echo, (big,)) == big
        out = p.apply(echo, (arrays[3],))
        assert out.flags.writeable and (out == arrays[3]).all()


def test_imap_endless_generator_is_lazy():
    seen = []

    def gen():
        for i in itertools.count():
            seen.append(i)
            yield i

    with Pool(2) as p:
        it = p.imap(square, gen())
        assert [next(it) for _ in range(50)] == [i * i for i in range(50)]
        time.sleep(0.1)
        assert len(seen) < 100  # a bounded window ahead, not the whole generator


def test_imap_iterable_that_raises():
    def gen():
        yield 1
        yield 2
        raise KeyError("from the iterable")

    with Pool(2) as p:
        it = p.imap(square, gen())
        assert next(it) == 1 and next(it) == 4
        with pytest.raises(KeyError):
            next(it)


def test_native_kernel_runs_in_process():
    fib = pyparallel.kernels.fib
    with Pool(2) as p:
        xs = list(range(15, 25))
        assert p.map(fib, xs) == [fib(x) for x in xs]
        assert list(p.imap(fib, xs)) == [fib(x) for x in xs]
        assert p.apply(fib, (20,)) == fib(20)
        assert p.map_async(fib, xs).get(30) == [fib(x) for x in xs]
        with pytest.raises(TypeError):
            p.map(fib, ["a"])


def test_default_start_method_rule():
    # multiprocessing's own default, whatever threads run in the process
    expected = multiprocessing.get_context().get_start_method()
    assert default_start_method() == expected
    ev = threading.Event()
    t = threading.Thread(target=ev.wait)
    t.start()
    try:
        assert default_start_method() == expected
        with Pool(1) as p:
            assert p.start_method == expected
            assert f"start_method={expected}" in repr(p)
    finally:
        ev.set()
        t.join()


def test_threadpool_api():
    got = []
    with ThreadPool(2) as p:
        assert p.map(square, range(10)) == [x * x for x in range(10)]
        assert p.apply(add, (1, 2)) == 3
        assert list(p.imap(square, range(5))) == [0, 1, 4, 9, 16]
        p.apply_async(square, (3,), callback=got.append).wait(10)
        assert p.map(pyparallel.kernels.fib, [10, 20]) == [pyparallel.kernels.fib(10),
                                                             pyparallel.kernels.fib(20)]
    assert got == [9]


# ---- whole-process behaviour, in a subprocess ----

_SCRIPT_PRELUDE = """
import os, sys, time, signal
sys.path.insert(0, {tests!r})
import pyparallel
from test_pool import sleepy
"""


def _run_script(body, **kw):
    src = _SCRIPT_PRELUDE.format(tests=os.path.dirname(__file__)) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", src], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_gone(pids, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{pid}") for pid in pids):
            return True
        time.sleep(0.05)
    return False


def test_ctrl_c_during_map_raises_and_leaves_nothing():
    # the map would take 20 minutes: only the interrupt ends it within the hang guard
    proc = _run_script("""
        p = pyparallel.Pool(2)
        try:
            print(*[w.pid for w in p._pool], flush=True)
            p.map(sleepy, [600] * 4, chunksize=1)
        except KeyboardInterrupt:
            print("KI", flush=True)
            sys.exit(3)
    """)
    pids = [int(x) for x in proc.stdout.readline().split()]
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "KI" in out
    assert _wait_gone(pids), "workers left behind"


def test_interpreter_exit_reaps_unclosed_pool():
    proc = _run_script("""
        p = pyparallel.Pool(2)
        print(*[w.pid for w in p._pool], flush=True)
        p.map_async(sleepy, [5] * 4, chunksize=1)
    """)
    out, err = proc.communicate(timeout=30)
    pids = [int(x) for x in out.split()]
    assert proc.returncode == 0, err
    assert _wait_gone(pids), "workers left behind"


def test_parent_killed_workers_exit():
    proc = _run_script("""
        p = pyparallel.Pool(2)
        print(*[w.pid for w in p._pool], flush=True)
        time.sleep(60)
    """)
    pids = [int(x) for x in proc.stdout.readline().split()]
    proc.kill()
    proc.communicate()
    assert _wait_gone(pids), "orphaned workers did not exit"


def test_forked_child_does_not_touch_parents_pool():
    with Pool(2) as p:
        pid = os.fork()
        if pid == 0:  # the child's copy of the pool refuses work and terminates nothing
            code = 0
            try:
                p.map(square, [1])
                code = 1
            except ValueError:
                pass
            p.terminate()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert p.map(square, range(5)) == [0, 1, 4, 9, 16]


def test_starmap_async_and_map_error_callback():
    errs = []
    with Pool(2) as p:
        assert p.starmap_async(add, [(1, 2), (3, 4)]).get(30) == [3, 7]
        r = p.map_async(boom, range(8), chunksize=2, error_callback=errs.append)
        with pytest.raises(ZeroDivisionError):
            r.get(30)
        assert not r.successful()
    assert len(errs) == 1 and isinstance(errs[0], ZeroDivisionError)


_scale = 2


def test_by_value_functions_keep_the_workers_globals():
    # A worker's namespace is filled with the names it lacks and never overwritten, so a
    # global rebound in the parent after the workers have it is not seen, as under fork.
    src = "def f(x):\n    return x * _scale\n"
    ns = {"__name__": "__main__", "_scale": 2}
    exec(src, ns)  # a function "defined in __main__": pickled by value
    f = ns["f"]
    with Pool(1, context="spawn") as p:
        assert p.map(f, [1, 2]) == [2, 4]
        ns["_scale"] = 10
        assert p.map(f, [1, 2]) == [2, 4]
        exec(src.replace("def f", "def g"), ns)  # a new function still reads the worker's
        assert p.map(ns["g"], [1, 2]) == [2, 4]


def _raise_on_load(msg):
    raise LookupError(msg)


class FailsToUnpickle:
    """Pickles fine; raises wherever it is unpickled."""

    def __init__(self, msg):
        self.msg = msg

    def __reduce__(self):
        return (_raise_on_load, (self.msg,))


def returns_fails_to_unpickle(x):
    return FailsToUnpickle(f"result {x}")


def test_unpickling_failures_fail_only_their_task():
    with Pool(2) as p:
        with pytest.raises(LookupError, match="in worker"):
            p.apply(echo, (FailsToUnpickle("in worker"),))
        with pytest.raises(LookupError, match="result 1"):
            p.apply(returns_fails_to_unpickle, (1,))
        assert p.map(square, range(3)) == [0, 1, 4]


def test_many_threads_wait_on_one_result():
    with Pool(2) as p:
        r = p.apply_async(sleepy, (0.3,))
        got = []
        ts = [threading.Thread(target=lambda: got.append(r.get(30))) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert got == [0.3] * 4
        assert r.wait(0) is None  # as multiprocessing: wait() returns None


def test_terminate_while_other_threads_wait_and_submit():
    """terminate() (which unmaps the channel) while other threads are inside the channel's
    GIL-free waits: they get an error, nothing crashes."""
    for _ in range(5):
        p = Pool(2)
        errors, stop = [], threading.Event()

        def hammer():
            while not stop.is_set():
                try:
                    p.apply_async(echo, (1,)).get(10)
                except (ValueError, PoolTerminatedError) as e:
                    errors.append(type(e))
                    return

        ts = [threading.Thread(target=hammer) for _ in range(3)]
        for t in ts:
            t.start()
        time.sleep(0.05)
        p.terminate()
        stop.set()
        for t in ts:
            t.join(30)
        assert not any(t.is_alive() for t in ts)
        assert errors and set(errors) <= {ValueError, PoolTerminatedError}
        p.join()


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_or_thread_leak_over_many_pools():
    def cycle():
        p = Pool(2, context="fork")
        assert p.map(square, range(10)) == [x * x for x in range(10)]
        p.close()
        p.join()
        with Pool(1, context="fork") as q:
            q.apply(square, (2,))

    cycle()  # warm-up: lazily created module state
    gc.collect()
    fds, threads = _fd_count(), threading.active_count()
    for _ in range(15):
        cycle()
    gc.collect()
    assert _fd_count() <= fds
    assert threading.active_count() <= threads


@pytest.mark.stress
def test_stress_random_kills_during_imap():
    import random

    with Pool(3) as p:
        it = p.imap(sleepy, [0.01] * 400)
        got = lost = 0
        for i in range(400):
            if i % 50 == 25:
                victim = random.choice(list(p._pool))
                os.kill(victim.pid, signal.SIGKILL)
            try:
                next(it)
                got += 1
            except WorkerLostError:
                lost += 1
        assert got + lost == 400 and lost <= 8
