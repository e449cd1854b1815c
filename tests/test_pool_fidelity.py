"""The habits of multiprocessing users hold (issue: drop-in fidelity): initializer globals,
big globals not re-sent, the default start method, scripts without a main guard, Ctrl-C that
leaves the pool usable, results pickled as multiprocessing pickles them."""
import multiprocessing
import multiprocessing.pool
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import pyparallel as pp
from pyparallel.pool import MaybeEncodingError, TaskCancelledError

pytestmark = pytest.mark.usefixtures("no_leaks")


def _script(tmp_path, body, *args, timeout=120, env=None):
    """Runs ``body`` as a main script (its own file, as a user runs one)."""
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    e = dict(os.environ, PYTHONPATH=os.getcwd())
    e.update(env or {})
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=str(tmp_path))


# ---- functions and globals of __main__ ----

INIT_SCRIPT = """
import sys
import pyparallel as pp

G = None

def init(value):
    global G
    G = value

def task(x):
    return (x, G)

if __name__ == "__main__":
    with pp.Pool(2, initializer=init, initargs=("set",), context=sys.argv[1]) as p:
        print(p.map(task, range(3)), p.apply(task, (9,)), list(p.imap(task, [5])))
"""


def test_initializer_global_is_seen_by_tasks(tmp_path, pool_context):
    out = _script(tmp_path, INIT_SCRIPT, pool_context)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == \
        "[(0, 'set'), (1, 'set'), (2, 'set')] (9, 'set') [(5, 'set')]"


NO_GUARD_SCRIPT = """
import sys
import pyparallel as pp
print("top level", flush=True)

SCALE = 3

class Point:
    def __init__(self, v):
        self.v = v

def times(x):
    return x * SCALE

def bump(p):
    return Point(p.v + 1)

method = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "default" else None
pool = pp.Pool(2, context=method)
print(pool.start_method, pool.map(times, range(4)), [q.v for q in pool.map(bump, [Point(1)])],
      type(pool.apply(bump, (Point(0),))) is Point, flush=True)
pool.close()
pool.join()
"""


@pytest.mark.parametrize("method", ["default", "fork", "forkserver", "spawn"])
def test_script_without_main_guard(tmp_path, method):
    out = _script(tmp_path, NO_GUARD_SCRIPT, method)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines.count("top level") == 1, out.stdout  # the top level ran exactly once
    expected = multiprocessing.get_start_method() if method == "default" else method
    assert lines[1] == f"{expected} [0, 3, 6, 9] [2] True"
    assert "bootstrapping phase" not in out.stderr


BIG_GLOBAL_SCRIPT = """
import sys
import pyparallel as pp

BIG = bytes(30 << 20)

def size(i):
    return len(BIG) + i

if __name__ == "__main__":
    sent = []
    from pyparallel._pool.local import engine
    original = engine.LocalBackend._send
    def counting(self, slot, parts):
        sent.append(sum(len(p) for p in parts))
        return original(self, slot, parts)
    engine.LocalBackend._send = counting
    with pp.Pool(2, context=sys.argv[1]) as p:
        r = p.map(size, range(100), chunksize=1)
        r += p.map(size, range(100), chunksize=1)
    assert r[7] == (30 << 20) + 7
    print(sum(sent) >> 20)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_big_global_is_not_sent_with_every_task(tmp_path, method):
    out = _script(tmp_path, BIG_GLOBAL_SCRIPT, method)
    assert out.returncode == 0, out.stderr
    megabytes = int(out.stdout.split()[-1])
    if method == "fork":
        assert megabytes == 0  # the workers inherited BIG: nothing of it is sent
    else:
        assert 30 <= megabytes <= 2 * 31  # once to each of the two workers, not 200 times


def test_big_by_value_function_warns_once(tmp_path):
    body = """
    import warnings
    import pyparallel as pp
    warnings.simplefilter("always")
    BIG = bytes(12 << 20)
    def size(i):
        return len(BIG)
    if __name__ == "__main__":
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with pp.Pool(1, context="spawn") as p:
                p.map(size, range(3))
                p.map(size, range(3))
        print(sum("travels by value" in str(x.message) for x in w))
    """
    out = _script(tmp_path, body)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "1"


def test_function_defined_after_the_fork_works(tmp_path):
    body = """
    import pyparallel as pp
    pool = pp.Pool(2, context="fork")
    K = 5
    def later(x):      # defined after the workers were forked: they lack it
        return x + K
    print(pool.map(later, range(3)))
    pool.close(); pool.join()
    """
    out = _script(tmp_path, body)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[5, 6, 7]"


# ---- the default start method ----


def test_default_start_method_is_stable_with_threads(tmp_path):
    body = """
    import threading, multiprocessing, multiprocessing.pool
    import numpy            # OpenBLAS threads
    import pyparallel as pp
    with multiprocessing.pool.ThreadPool(2) as tp:
        tp.map(abs, range(10))
    methods = set()
    for _ in range(30):
        with pp.Pool(1) as p:
            methods.add(p.start_method)
    ev = threading.Event(); t = threading.Thread(target=ev.wait); t.start()
    with pp.Pool(1) as p:
        methods.add(p.start_method)
    ev.set(); t.join()
    print(sorted(methods), multiprocessing.get_start_method())
    """
    out = _script(tmp_path, body)
    assert out.returncode == 0, out.stderr
    methods, default = out.stdout.rsplit(" ", 1)
    assert methods == f"['{default.strip()}']"


def test_no_fork_warning_from_our_threads(tmp_path):
    body = """
    import warnings, os, signal
    warnings.simplefilter("error", DeprecationWarning)
    import pyparallel as pp
    def die(x):
        if x == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return x
    pp.kernels.fib.map([20] * 4, threads=2)
    with pp.Pool(2, context="fork") as p:   # the replacement is forked from the collector
        r = p.map_async(die, range(4), chunksize=1)
        try:
            r.get(60)
        except pp.pool.WorkerLostError:
            print("lost")
        print(p.map(abs, [-1, -2]))
    """
    out = _script(tmp_path, body)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["lost", "[1, 2]"]
    assert "multi-threaded" not in out.stderr


# ---- results travel like multiprocessing's ----


def lock_result(_):
    return threading.Lock()


def test_unpicklable_result_fails_with_maybe_encoding_error(pool_context):
    with pp.Pool(1, context=pool_context) as p:
        with pytest.raises(MaybeEncodingError):
            p.apply(lock_result, (1,))
        assert p.map(abs, [-3]) == [3]


def exit_in_task(x):
    if x == 1:
        sys.exit("task said goodbye")
    return x


def interrupt_in_task(x):
    raise KeyboardInterrupt("from the task")


def test_base_exceptions_in_tasks_reach_the_caller():
    with pp.Pool(1) as p:
        with pytest.raises(SystemExit, match="task said goodbye"):
            p.map(exit_in_task, range(3))
        with pytest.raises(KeyboardInterrupt, match="from the task"):
            p.apply(interrupt_in_task, (1,))
        assert p.map(exit_in_task, [0, 2]) == [0, 2]  # the worker is still there


def deep(_):
    x = []
    for _ in range(100000):
        x = [x]
    return x


def test_result_too_deep_to_pickle_fails_that_task():
    with pp.Pool(1) as p:
        with pytest.raises(MaybeEncodingError):
            p.apply(deep, (0,))
        assert p.apply(abs, (-4,)) == 4


# ---- Ctrl-C leaves the pool usable ----

INTERRUPT_SCRIPT = """
import os, signal, sys, threading, time
import pyparallel as pp

def slow(x):
    time.sleep(x)
    return x

if __name__ == "__main__":
    pool = pp.Pool(2, context=sys.argv[1])
    other = pool.map_async(abs, [-1, -2, -3])       # another call: must not be lost
    pids = {w.pid for w in pool._pool}
    for call in ("map", "imap", "apply", "get"):
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        t = time.monotonic()
        try:
            if call == "map":
                pool.map(slow, [30] * 4, chunksize=1)
            elif call == "imap":
                list(pool.imap(slow, [30] * 4))
            elif call == "apply":
                pool.apply(slow, (30,))
            else:
                r = pool.map_async(slow, [30, 30])
                r.get()
        except KeyboardInterrupt:
            print(call, "interrupted", round(time.monotonic() - t) < 10, flush=True)
    print("state", pool._state, pool.map(abs, [-5, -6]), other.get(10), flush=True)
    try:
        r.get(5)
    except pp.pool.TaskCancelledError:
        print("cancelled result fails", flush=True)
    print("workers replaced", pids.isdisjoint({w.pid for w in pool._pool}), flush=True)
    pool.close(); pool.join()
    print("done", flush=True)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_survives_ctrl_c(tmp_path, method):
    out = _script(tmp_path, INTERRUPT_SCRIPT, method)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:4] == [f"{c} interrupted True" for c in ("map", "imap", "apply", "get")]
    assert lines[4] == "state RUN [5, 6] [1, 2, 3]"
    assert lines[5:] == ["cancelled result fails", "workers replaced True", "done"]


def sleep_then(x):
    time.sleep(x)
    return x


def test_cancel_keeps_other_calls():
    with pp.Pool(2) as p:
        keep = p.map_async(sleep_then, [0.3, 0.3, 0.3], chunksize=1)
        drop = p.map_async(sleep_then, [20, 20], chunksize=1)
        time.sleep(0.2)
        p._backend.cancel(drop)
        assert keep.get(30) == [0.3, 0.3, 0.3]
        with pytest.raises(TaskCancelledError):
            drop.get(5)
        assert p.map(abs, [-1]) == [1]


# ---- multiprocessing's introspection ----


def test_pool_workers_and_repopulate():
    with pp.Pool(3, maxtasksperchild=2) as p:
        assert len(p._pool) == 3
        before = sorted(w.pid for w in p._pool)
        assert all(w.is_alive() and w.exitcode is None for w in p._pool)
        assert p.map(abs, range(-20, 0), chunksize=1) == list(range(20, 0, -1))
        p._repopulate_pool()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
                len(p._pool) == 3 and all(w.is_alive() for w in p._pool)):
            time.sleep(0.05)
            p._repopulate_pool()
        after = sorted(w.pid for w in p._pool)
        assert None not in after and len(after) == 3
        assert after != before


def test_start_failure_stops_the_started_workers():
    from unittest import mock

    started = []

    class FailingProcess:
        def __init__(self, **kwargs):
            self.state = None
            started.append(self)

        def start(self):
            if len(started) > 3:
                raise OSError("no more processes")
            self.state = "started"

        def terminate(self):
            self.state = "stopping"

        def join(self):  # no timeout argument, like the stdlib's test double
            if self.state == "stopping":
                self.state = "stopped"

        def is_alive(self):
            return self.state in ("started", "stopping")

    with pytest.raises(OSError, match="no more processes"):
        pp.Pool(5, context=mock.MagicMock(Process=FailingProcess))
    assert started and not any(p.is_alive() for p in started)


def test_warns_once_when_a_foreign_openmp_runtime_is_alive(monkeypatch):
    from pyparallel._pool import context

    monkeypatch.setattr(context, "_warned", [])
    monkeypatch.setattr(context, "_openmp_runtimes", lambda: {
        "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0",  # the system runtime pyparallel uses
        "/venv/site-packages/scikit_learn.libs/libgomp-a34b3233.so.1.0.0"})
    monkeypatch.setattr(context, "_unknown_threads", lambda: 3)
    with pytest.warns(RuntimeWarning, match="scikit_learn.libs/libgomp") as w:
        with pp.Pool(1, context="fork") as p:
            assert p.start_method == "fork"  # the method is not changed, only reported
            assert p.map(abs, [-1]) == [1]
        with pp.Pool(1, context="fork"):
            pass
    assert len([x for x in w if "OpenMP" in str(x.message)]) == 1
    monkeypatch.setattr(context, "_warned", [])
    monkeypatch.setattr(context, "_unknown_threads", lambda: 0)  # no live thread: no hazard
    assert context.fork_hazard() is None


def test_no_fork_hazard_from_our_own_runtime_or_numpy():
    pytest.importorskip("numpy")
    from pyparallel._pool import context

    pp.kernels.fib.map([25] * 4, threads=2)
    assert context.fork_hazard() is None


def test_openmp_runtimes_are_those_mapped_into_the_process():
    """The loader's list (read instead of /proc/self/maps, which costs a pool's creation
    1-2 ms in a process with numpy imported) names the same OpenMP runtimes as the maps."""
    from pyparallel._pool import context

    mapped = set()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.rsplit(" ", 1)[-1].strip()
            name = path.rsplit("/", 1)[-1]
            if name.startswith(("libgomp", "libiomp", "libomp")) and ".so" in name:
                mapped.add(path)
    found = context._openmp_runtimes()
    assert {os.path.realpath(p) for p in found} == {os.path.realpath(p) for p in mapped}
    assert pp._core.loaded_objects()  # and the list is not empty whatever is linked
    assert any(p.endswith(os.path.basename(pp._core.__file__)) for p in pp._core.loaded_objects())
