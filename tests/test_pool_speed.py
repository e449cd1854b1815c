"""The local engine's fast paths keep the stdlib's results: tasks never wait behind a running
one while a worker is idle (stealing queued tasks back), big results out of band."""
import os
import time

import pytest

import pyparallel as pp

pytestmark = pytest.mark.usefixtures("no_leaks")

np = pytest.importorskip("numpy")


def nap(x):
    time.sleep(x)
    return os.getpid()


def quick(x):
    return x * 2


def total(a):
    return float(a.sum())


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_quick_tasks_do_not_wait_behind_a_long_one(context):
    with pp.Pool(2, context=context) as p:
        p.map(quick, range(4))  # started, and the engine has seen short tasks
        long = p.apply_async(nap, (5,))
        quick_ones = [p.apply_async(quick, (i,)) for i in range(8)]
        assert [r.get(30) for r in quick_ones] == [2 * i for i in range(8)]
        assert not long.ready()  # each quick one ran beside the long one, none after it
        long.get(30)


def test_stolen_tasks_run_once_each(tmp_path):
    # Quick tasks queued behind long ones are taken back for the idle worker; every task
    # runs exactly once (each appends its number to a file), whoever wins each claim.
    path = str(tmp_path / "ran")
    with pp.Pool(2) as p:
        for _ in range(3):
            rs = [p.apply_async(_append, (path, i, 0.3 if i % 5 == 0 else 0)) for i in range(30)]
            assert [r.get(30) for r in rs] == list(range(30))
    with open(path) as f:
        ran = sorted(int(x) for x in f.read().split())
    assert ran == sorted(list(range(30)) * 3)


def _append(path, i, pause):
    time.sleep(pause)
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i


def test_stealing_keeps_maxtasksperchild():
    # A stolen task counts against the worker that runs it, not the one it was queued on:
    # both workers keep their limit, and the pool goes on with new workers.
    with pp.Pool(2, maxtasksperchild=2) as p:
        long = p.apply_async(nap, (1,))
        rs = [p.apply_async(nap, (0.01,)) for _ in range(6)]
        pids = [r.get(30) for r in rs] + [long.get(30)]
        assert all(pids.count(pid) <= 2 for pid in set(pids))


def test_stolen_task_with_spilled_arguments():
    arrays = [np.full(1 << 18, i, dtype=np.float64) for i in range(6)]  # 2 MiB each: spilled
    with pp.Pool(2) as p:
        long = p.apply_async(nap, (2,))
        rs = [p.apply_async(total, (a,)) for a in arrays]
        assert [r.get(30) for r in rs] == [float(a.sum()) for a in arrays]
        assert not long.ready()
        long.get(30)


def test_stolen_task_keeps_its_timeout():
    with pp.Pool(2) as p:
        long = p.apply_async(nap, (2,))
        stuck = p.apply_async(nap, (60,), task_timeout=0.5)
        with pytest.raises(pp.TaskTimeoutError):
            stuck.get(30)
        assert not long.ready()
        long.get(30)
