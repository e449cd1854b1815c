"""Forking after a kernel has run never hangs (GNU OpenMP is not fork-safe by itself).

Each child is bounded: the parent waits with a deadline and kills a child that overruns,
which then fails the test instead of hanging the suite.
"""
import multiprocessing
import os
import select
import signal
import threading
import time

import pytest

from pyparallel import kernels

EXPECTED = [kernels.fib(n) for n in range(20, 28)]
DEADLINE = 30.0


def _bulk():
    return kernels.fib.map(range(20, 28), threads=2)


def _wait_child(pid, read_fd):
    """The child's output, or a failure if it has not exited within the deadline."""
    end = time.monotonic() + DEADLINE
    chunks = []
    while True:
        left = end - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("forked child hung in its kernel")
        r, _, _ = select.select([read_fd], [], [], min(left, 0.5))
        if r:
            data = os.read(read_fd, 4096)
            if not data:
                break
            chunks.append(data)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    return b"".join(chunks).decode()


def _fork_and_run_bulk():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: run a bulk kernel, report, exit without cleanup
        try:
            os.close(r)
            os.write(w, repr(_bulk()).encode())
            os._exit(0)
        finally:
            os._exit(1)
    os.close(w)
    try:
        return _wait_child(pid, r)
    finally:
        os.close(r)


@pytest.mark.parametrize("threads", [2, 4])
def test_os_fork_after_bulk_kernel(threads):
    assert kernels.fib.map(range(20, 28), threads=threads) == EXPECTED
    assert _fork_and_run_bulk() == repr(EXPECTED)


def test_os_fork_after_kernel_on_another_thread():
    t = threading.Thread(target=_bulk)
    t.start()
    t.join()
    assert _fork_and_run_bulk() == repr(EXPECTED)


def test_nested_fork_after_kernels():
    # A child that ran a kernel forks a grandchild that runs one too.
    _bulk()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _bulk()
            os.write(w, _fork_and_run_bulk().encode())
            os._exit(0)
        finally:
            os._exit(1)
    os.close(w)
    try:
        assert _wait_child(pid, r) == repr(EXPECTED)
    finally:
        os.close(r)


def _child_target(queue):
    queue.put(_bulk())


def test_multiprocessing_fork_process_after_bulk_kernel():
    _bulk()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child_target, args=(queue,))
    p.start()
    try:
        assert queue.get(timeout=DEADLINE) == EXPECTED
    finally:
        p.join(DEADLINE)
        if p.is_alive():
            p.kill()
            p.join()
    assert p.exitcode == 0


def test_multiprocessing_fork_pool_after_bulk_kernel():
    _bulk()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        res = pool.map_async(kernels.fib.map, [range(20, 28)] * 4)
        assert res.get(timeout=DEADLINE) == [EXPECTED] * 4


def test_fork_while_another_thread_runs_a_bulk_kernel():
    # The team master is busy in the parent when fork() happens; the child must start its own.
    started = threading.Event()

    def long_bulk():
        started.set()
        kernels.fib.map([36] * 16, threads=2)

    t = threading.Thread(target=long_bulk)
    t.start()
    started.wait()
    time.sleep(0.05)
    try:
        assert _fork_and_run_bulk() == repr(EXPECTED)
    finally:
        t.join()
