"""pyparallel.get_reusable_pool: one warm worker set per process."""
import os
import time

import pytest

import pyparallel as pp
from pyparallel import _reuse


def pid_after(t):
    time.sleep(t)
    return os.getpid()


def square(x):
    return x * x


def worker_pids(pool, n=8):
    return set(pool.map(pid_after, [0.05] * n, chunksize=1))


def test_second_call_returns_the_same_warm_workers():
    a = pp.get_reusable_pool(2)
    pids = worker_pids(a)
    b = pp.get_reusable_pool(2)
    assert b is a
    assert worker_pids(b) <= pids
    assert isinstance(a, pp.Pool)


def test_with_block_leaves_it_running():
    with pp.get_reusable_pool(2) as pool:
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
    assert pp.get_reusable_pool(2) is pool
    assert pool.apply(square, (3,)) == 9


def test_other_arguments_replace_it_and_the_old_one_finishes_its_work():
    a = pp.get_reusable_pool(2)
    pending = a.map_async(pid_after, [0.2] * 4, chunksize=1)
    b = pp.get_reusable_pool(3)
    assert b is not a
    assert len(pending.get(30)) == 4  # what was submitted to the old pool still completes
    with pytest.raises(ValueError):
        a.apply(square, (2,))  # the old one takes no more work
    assert b.apply(square, (4,)) == 16


def test_terminated_pool_is_rebuilt():
    a = pp.get_reusable_pool(2)
    a.terminate()
    b = pp.get_reusable_pool(2)
    assert b is not a
    assert b.apply(square, (5,)) == 25


def test_bad_arguments_leave_the_warm_pool_alone():
    a = pp.get_reusable_pool(2)
    with pytest.raises(ValueError):
        pp.get_reusable_pool(0)
    assert pp.get_reusable_pool(2) is a


def test_lease_keeps_a_replaced_pool_open_until_released():
    lease = _reuse.lease(2)
    try:
        other = pp.get_reusable_pool(3)
        assert other is not lease.pool
        assert lease.pool.apply(square, (6,)) == 36  # still running: leased
    finally:
        lease.release()
    with pytest.raises(ValueError):
        lease.pool.apply(square, (2,))


def test_plain_pool_keeps_its_own_workers():
    warm = pp.get_reusable_pool(2)
    warm_pids = worker_pids(warm)
    with pp.Pool(2) as pool:
        assert not (worker_pids(pool) & warm_pids)
    assert pp.get_reusable_pool(2) is warm


def test_initargs_compared_by_value():
    a = pp.get_reusable_pool(2, initializer=print, initargs=("",))
    assert pp.get_reusable_pool(2, initializer=print, initargs=("",)) is a
    assert pp.get_reusable_pool(2, initializer=print, initargs=("x",)) is not a


def test_forked_child_does_not_use_the_parents_pool(pool_context):
    # under forkserver the child must not use its parent's forkserver either (the stdlib's
    # ensure_running() fails there with ChildProcessError)
    pool = pp.get_reusable_pool(2, context=pool_context)
    pid = os.fork()
    if pid == 0:  # the child: asks for its own (and never touches the parent's)
        code = 1
        try:
            mine = pp.get_reusable_pool(2, context=pool_context)
            code = 0 if (mine is not pool and mine.apply(square, (7,)) == 49) else 2
            mine.terminate()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.apply(square, (8,)) == 64


def test_terminated_at_interpreter_exit(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "s.py"
    script.write_text(
        "import pyparallel as pp, os\n"
        "p = pp.get_reusable_pool(2)\n"
        "print(*sorted(set(p.map(lambda _: os.getpid(), range(8), chunksize=1))))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    pids = [int(x) for x in out.stdout.split()]
    assert pids
    time.sleep(0.2)
    for p in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)
