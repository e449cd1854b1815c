"""Everyday tools on the pool: progress bars, per-task timeouts, worker identity."""
import io
import os
import signal
import sys
import time
import types

import pytest

import pyparallel as pp
from pyparallel import TaskTimeoutError

pytestmark = pytest.mark.usefixtures("no_leaks")


def square(x):
    return x * x


def sleep_if(x):
    if x == 3:
        time.sleep(600)
    return x


def imported():
    """An initializer: the worker imports this module while it starts (under spawn and
    forkserver that takes a while), not inside a task's budget."""


def whoami(_=None):
    return pp.current_worker()


def die_once(path):
    if not os.path.exists(path):
        open(path, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return pp.current_worker()


# ---- progress ----


def test_progress_bar_reaches_the_total():
    tqdm = pytest.importorskip("tqdm")
    out = io.StringIO()
    bar = tqdm.tqdm(total=None, file=out, mininterval=0, ascii=True)
    with pp.Pool(2) as p:
        assert p.map(square, range(50), chunksize=5, progress=bar) == [x * x for x in range(50)]
    assert bar.n == 50 and bar.total == 50
    assert "50/50" in out.getvalue()


def test_progress_callable_gets_counts_as_tasks_finish():
    seen = []
    with pp.Pool(2) as p:
        r = p.map_async(square, range(40), chunksize=4, progress=lambda d, t: seen.append((d, t)))
        assert r.get(60) == [x * x for x in range(40)]
        assert seen[-1] == (40, 40)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        assert len(seen) == 10  # one per chunk
        seen.clear()
        out = list(p.imap_unordered(square, iter(range(7)), progress=lambda d, t: seen.append((d, t))))
        assert sorted(out) == [x * x for x in range(7)]
        assert seen[-1] == (7, None)  # a generator has no length
        seen.clear()
        assert p.starmap(pow, [(2, 3), (3, 2)], progress=lambda d, t: seen.append(d)) == [8, 9]
        assert seen[-1] == 2


def test_progress_true_uses_tqdm_and_needs_the_extra(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    with pp.Pool(1) as p:
        assert p.map(square, range(10), progress=True) == [x * x for x in range(10)]
        assert "10/10" in capsys.readouterr().err
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
        with pytest.raises(ImportError, match=r"pyparallel\[progress\]"):
            p.map(square, range(3), progress=True)
        with pytest.raises(TypeError, match="progress must be"):
            p.map(square, range(3), progress="yes")
        assert not p._cache  # nothing was submitted


def test_progress_true_in_jupyter_needs_ipywidgets(monkeypatch):
    # tqdm.auto in a Jupyter kernel without ipywidgets warns (TqdmWarning: IProgress not
    # found) and prints a text bar: refuse before any work instead, naming the extra
    pytest.importorskip("tqdm")
    kernel = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as if it were not installed
    with pp.Pool(1) as p:
        with pytest.raises(ImportError, match=r"ipywidgets in Jupyter: pip install "
                                              r"'pyparallel\[progress\]'"):
            p.map(square, range(3), progress=True)
        assert not p._cache


# ---- per-task timeouts ----


def test_a_stuck_task_times_out_and_the_others_finish():
    # the others must finish within 5 s each, even on a busy machine
    with pp.Pool(2, task_timeout=5.0, initializer=imported) as p:
        t = time.monotonic()
        rs = [p.apply_async(sleep_if, (i,)) for i in range(8)]
        got = {}
        for i, r in enumerate(rs):
            try:
                got[i] = r.get(60)
            except TaskTimeoutError as e:
                got[i] = e
        assert time.monotonic() - t < 120  # hang guard: the stuck task sleeps 600 s
        assert [got[i] for i in range(8) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
        err = got[3]
        assert isinstance(err, TaskTimeoutError) and isinstance(err, TimeoutError)
        assert isinstance(err, pp.pool.TimeoutError)
        assert "sleep_if(3)" in str(err) and "task_timeout (5 s)" in str(err)
        assert p.map(square, [2]) == [4]  # the pool goes on, with a replaced worker


def test_timeout_per_call_and_chunk_budget():
    with pp.Pool(2, initializer=imported) as p:
        with pytest.raises(TaskTimeoutError, match="task 3 of the call"):
            p.map(sleep_if, range(6), chunksize=1, task_timeout=0.5)
        with pytest.raises(TaskTimeoutError, match=r"chunk of tasks 2\.\.3"):
            p.map(sleep_if, range(4), chunksize=2, task_timeout=0.5)
        with pytest.raises(TaskTimeoutError):
            list(p.imap(sleep_if, range(5), task_timeout=0.5))
        # a budget that is not exceeded changes nothing
        assert p.map(square, range(20), chunksize=5, task_timeout=30) == [x * x for x in range(20)]


def slow_start(t):
    time.sleep(t)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_budget_starts_when_the_worker_is_up(method):
    # the worker's start-up and initializer (2 s) are not part of a task's budget (1 s)
    with pp.Pool(1, initializer=slow_start, initargs=(2.0,), context=method,
                 task_timeout=1.0) as p:
        assert p.map(square, range(4), chunksize=1) == [0, 1, 4, 9]


def test_kernel_call_times_out():
    with pp.Pool(2) as p:
        with pytest.raises(TaskTimeoutError, match="kernel"):
            p.map(pp.kernels.fib, [90, 90], task_timeout=0.3)
        assert p.map(pp.kernels.fib, [10]) == [55]


def test_bad_timeouts_and_thread_pool():
    with pytest.raises(ValueError):
        pp.Pool(1, task_timeout=0)
    with pytest.raises(TypeError):
        pp.Pool(1, task_timeout="1")
    with pp.Pool(1) as p:
        with pytest.raises(ValueError):
            p.map(square, [1], task_timeout=-1)
        assert not p._cache
    with pytest.raises(ValueError, match="ThreadPool"):
        pp.ThreadPool(1, task_timeout=1)


# ---- worker identity ----


def test_current_worker(tmp_path):
    assert pp.current_worker() is None
    with pp.Pool(3) as p:
        infos = p.map(whoami, range(30), chunksize=1)
        assert {i.index for i in infos} <= {0, 1, 2}
        assert {i.pid for i in infos} <= {w.pid for w in p._pool}
        for info in infos:
            assert info == (info.index, info.pid)
    with pp.Pool(1) as p:
        first = p.apply(whoami)
        flag = str(tmp_path / "died")
        with pytest.raises(pp.pool.WorkerLostError):
            p.apply(die_once, (flag,))
        after = p.apply(die_once, (flag,))
        assert after.index == first.index == 0 and after.pid != first.pid
