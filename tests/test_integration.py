"""The capabilities together: shared objects as pyparallel.Pool task arguments (by handle,
every start method), kernels through the Pool, and forking after kernels."""
import multiprocessing
import pytest

import pyparallel as pp
from pyparallel import kernels

np = pytest.importorskip("numpy")


def fill(args):
    arr, lo, hi = args
    view = np.asarray(arr)
    view[lo:hi] = np.arange(lo, hi, dtype=view.dtype) * 2
    return int(view[lo:hi].sum())


def deposit(args):
    balance, n = args
    for _ in range(n):
        balance.add(1)
    return n


def locked_deposit(args):
    value, n = args
    for _ in range(n):
        with value.get_lock():
            value.value += 1
    return n


def test_array_by_handle_through_pyparallel_pool(pool_context):
    arr = pp.Array("d", 100_000, lock=False)
    ranges = [(arr, lo, lo + 25_000) for lo in range(0, 100_000, 25_000)]
    with pp.Pool(2, context=pool_context) as pool:
        sums = pool.map(fill, ranges)
    view = np.asarray(arr)
    np.testing.assert_array_equal(view, np.arange(100_000) * 2.0)  # the workers wrote our memory
    assert sum(sums) == view.sum()


def test_atomic_and_locked_counters_through_pyparallel_pool(pool_context):
    balance = pp.Value("q", 0, lock=False)
    locked = pp.Value("i", 0)
    with pp.Pool(2, context=pool_context) as pool:
        assert sum(pool.map(deposit, [(balance, 5_000)] * 4)) == 20_000
        assert sum(pool.map(locked_deposit, [(locked, 2_000)] * 4)) == 8_000
    assert balance.value == 20_000
    assert locked.value == 8_000


def test_pool_runs_kernels_in_process_and_agrees_with_processes():
    xs = list(range(15, 30))
    with pp.Pool(2) as pool:
        native = pool.map(kernels.fib, xs)
        by_name = pool.map(kernels.fib.__call__, xs)  # a bound method: goes to the workers
    assert native == by_name == [kernels.fib(x) for x in xs]


def test_fork_pool_after_bulk_kernel():
    kernels.fib.map([25] * 8, threads=2)
    with pp.Pool(2, context="fork") as pool:
        res = pool.map_async(kernels.fib.map, [[20, 21, 22]] * 4)
        assert res.get(timeout=60) == [[kernels.fib(20), kernels.fib(21), kernels.fib(22)]] * 4


def test_default_start_method_ignores_threads():
    # The default is multiprocessing's own, whatever threads run: the kernels' team, another
    # Python thread. Run in a clean interpreter (no numpy).
    import subprocess
    import sys

    code = (
        "import threading, pyparallel as pp\n"
        "from pyparallel import kernels, pool\n"
        "a = pool.default_start_method()\n"
        "kernels.fib.map([25] * 8, threads=2)\n"
        "assert len(pp._core.team_thread_ids()) >= 1\n"
        "b = pool.default_start_method()\n"
        "e = threading.Event(); t = threading.Thread(target=e.wait); t.start()\n"
        "c = pool.default_start_method()\n"
        "e.set(); t.join()\n"
        "print(a, b, c)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = multiprocessing.get_context().get_start_method()
    assert out.stdout.split() == [expected] * 3
