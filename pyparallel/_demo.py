"""``python -m pyparallel demo``: the classic teaching examples, side by side and timed.

Every row computes the same answer as the serial pure-Python row (checked, not assumed);
the speedup column is against that row. Pool-based rows include the pool's start-up, as a
user's script would: multiprocessing.Pool with fork, pyparallel.Pool with its default start
method.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import time

from . import kernels
from ._cpu import cpu_count

FIB_NS = [32, 31, 30, 29, 28, 27] * 2  # pure Python: about a second serially
FIB_BIG = [40, 39, 38, 37, 36, 35]  # native only: about half a second serially
CUBE_N, CUBE_TASKS = 4_000_000, 4


def py_fib(n):
    """The naive recursive Fibonacci the kernels reproduce."""
    return 1 if n <= 2 else py_fib(n - 1) + py_fib(n - 2)


def py_cube_loop(n):
    """``for i in range(n): i**3``, summed so the answer can be checked."""
    total = 0
    for i in range(n):
        total += i**3
    return total


def py_weighted_multiply(items, weights):
    return [(kind, number, number * weights[kind]) for kind, number in items]


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def _threads(fn, inputs, n):
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        return list(ex.map(fn, inputs))


def _processes(fn, inputs, n):
    with multiprocessing.get_context("fork").Pool(n) as pool:
        return pool.map(fn, inputs)


def _pyparallel_pool(fn, inputs, n):
    from .pool import Pool

    with Pool(n) as pool:
        return pool.map(fn, inputs)


class _Section:
    """Rows of one example: (label, seconds, speedup vs the first row), answers checked."""

    def __init__(self, title, workers):
        self.title, self.workers, self.rows = title, workers, []
        self.reference = None

    def run(self, label, fn):
        seconds, result = _timed(fn)
        if self.reference is None:
            self.reference = (seconds, result)
        elif result != self.reference[1]:
            raise AssertionError(f"{self.title}: {label} computed a different answer")
        self.rows.append((label, seconds, self.reference[0] / seconds if seconds else float("inf")))

    def print(self, out):
        print(f"\n{self.title}", file=out)
        print(f"  {'method':<52} {'seconds':>9} {'speedup':>8}", file=out)
        for label, seconds, speedup in self.rows:
            print(f"  {label:<52} {seconds:>9.3f} {speedup:>7.1f}x", file=out)


def run_demo(out=None, workers=None):
    """Runs every example and prints its table to ``out`` (stdout by default)."""
    import sys

    out = out or sys.stdout
    n = workers or cpu_count()
    print(f"pyparallel demo: {n} workers (cpu_count() = {cpu_count()}), "
          f"OpenMP: {'yes' if kernels.openmp else 'no (pthreads)'}", file=out)

    s = _Section(f"Naive fib over {FIB_NS}", n)
    s.run("pure Python, serial", lambda: [py_fib(x) for x in FIB_NS])
    s.run(f"pure Python, {n} threads (the GIL serialises them)", lambda: _threads(py_fib, FIB_NS, n))
    s.run(f"pure Python, multiprocessing.Pool({n})", lambda: _processes(py_fib, FIB_NS, n))
    s.run(f"pure Python, pyparallel.Pool({n})", lambda: _pyparallel_pool(py_fib, FIB_NS, n))
    s.run("pyparallel.kernels.fib, serial", lambda: [kernels.fib(x) for x in FIB_NS])
    s.run(f"pyparallel.kernels.fib, {n} Python threads", lambda: _threads(kernels.fib, FIB_NS, n))
    s.run("pyparallel.kernels.fib.map", lambda: kernels.fib.map(FIB_NS))
    s.print(out)

    s = _Section(f"Native fib over bigger inputs {FIB_BIG}", n)
    s.run("pyparallel.kernels.fib, serial", lambda: [kernels.fib(x) for x in FIB_BIG])
    s.run(f"pyparallel.kernels.fib, {n} Python threads", lambda: _threads(kernels.fib, FIB_BIG, n))
    s.run("pyparallel.kernels.fib.map", lambda: kernels.fib.map(FIB_BIG))
    s.run(f"pyparallel.Pool({n}).map(kernels.fib, ...) (threads)",
          lambda: _pyparallel_pool(kernels.fib, FIB_BIG, n))
    s.print(out)

    cubes = [CUBE_N] * CUBE_TASKS
    s = _Section(f"Cube loop: {CUBE_TASKS} tasks of `for i in range({CUBE_N:_}): i**3`", n)
    s.run("pure Python, serial", lambda: [py_cube_loop(x) for x in cubes])
    s.run(f"pure Python, {n} threads (the GIL serialises them)", lambda: _threads(py_cube_loop, cubes, n))
    s.run(f"pure Python, multiprocessing.Pool({n})", lambda: _processes(py_cube_loop, cubes, n))
    s.run(f"pure Python, pyparallel.Pool({n})", lambda: _pyparallel_pool(py_cube_loop, cubes, n))
    s.run("pyparallel.kernels.cube_loop, serial", lambda: [kernels.cube_loop(x) for x in cubes])
    s.run("pyparallel.kernels.cube_loop.map", lambda: kernels.cube_loop.map(cubes))
    s.print(out)

    from .shared import bank_account_demo

    deposits = 300_000
    print(f"\nBank account: {n} processes x {deposits:_} deposits of 1 into one shared Value",
          file=out)
    print(f"  {'method':<30} {'seconds':>9} {'balance':>10} {'expected':>10}", file=out)
    for name, seconds, total, expected in bank_account_demo(processes=n, deposits=deposits):
        verdict = "ok" if total == expected else "WRONG: updates lost"
        print(f"  {name:<30} {seconds:>9.3f} {total:>10_} {expected:>10_}  {verdict}", file=out)

    items = [("type1", i) for i in range(1, 10)] + [("type2", i) for i in range(1, 10)]
    weights = {"type1": 2, "type2": 3}
    result = kernels.weighted_multiply.map(items, weights)
    if result != py_weighted_multiply(items, weights):
        raise AssertionError("weighted_multiply disagrees with the Python version")
    print(f"\nWeighted multiply, weights {weights}:", file=out)
    for row in result:
        print(f"  {row}", file=out)
    return 0
