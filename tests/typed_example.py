"""A small program on pyparallel's public API, fully annotated: tests/test_types.py checks it
with ``mypy --strict`` (against the package's .pyi stubs) and also runs it.

The ``reveal``-style checks are plain assignments to annotated names: if a stub returned a
wider or different type, ``mypy --strict`` would reject the assignment.
"""
from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

import pyparallel as pp
from pyparallel import kernels
from pyparallel.futures import ProcessPoolExecutor
from pyparallel.pool import (ApplyResult, IMapIterator, IMapUnorderedIterator, MapResult,
                             TaskCancelledError, WorkerLostError)


def square(x: int) -> int:
    return x * x


def add(a: int, b: float) -> float:
    return a + b


def label(n: int, name: str, scale: float) -> str:
    return f"{name}{n * scale}"


def fill(job: tuple[pp.shared.SynchronizedArray[float], int, int]) -> int:
    arr, lo, hi = job
    view: npt.NDArray[np.float64] = np.asarray(arr)
    view[lo:hi] = np.arange(lo, hi, dtype=np.float64)
    return hi - lo


def where() -> tuple[int, int] | None:
    info = pp.current_worker()
    return None if info is None else (info.index, info.pid)


def progress(done: int, total: int) -> None:
    assert 0 < done <= total


def main() -> int:
    assert pp.current_worker() is None
    counts: list[int] = []
    with pp.Pool(2, task_timeout=30.0) as pool:
        squares: list[int] = pool.map(square, range(10), progress=progress)
        sums: list[float] = pool.starmap(add, [(1, 0.5), (2, 0.25)])
        labels: list[str] = pool.starmap(label, [(1, "x", 2.0)])
        one: int = pool.apply(square, (7,))
        pair: float = pool.apply(add, (1, 2.0), task_timeout=10)
        async_one: ApplyResult[int] = pool.apply_async(square, (3,), callback=counts.append)
        many: MapResult[int] = pool.map_async(square, [1, 2, 3], chunksize=1)
        ordered: IMapIterator[int] = pool.imap(square, iter(range(5)), progress=True)
        unordered: IMapUnorderedIterator[int] = pool.imap_unordered(square, range(5))
        by_kernel: Iterator[int] = pool.imap(kernels.fib, range(1, 10))
        fibs: list[int] = pool.map(kernels.fib, [10, 20])
        places: list[tuple[int, int] | None] = pool.map(lambda _: where(), range(2))
        first: int = ordered.next(timeout=30)
        got: int = async_one.get(timeout=30)
        total = sum(many.get(30)) + sum(ordered) + sum(unordered) + sum(by_kernel)
        assert squares[3] == 9 and sums == [1.5, 2.25] and labels == ["x2.0"]
        assert (one, pair, got, first, fibs) == (49, 3.0, 9, 0, [55, 6765])
        assert all(p is not None and p[0] in (0, 1) for p in places)
        print("pool ok", total, pool.start_method)

    arr = pp.Array("d", 8)
    with pp.get_reusable_pool(2) as warm:
        written: list[int] = warm.map(fill, [(arr, 0, 4), (arr, 4, 8)])
    total_written = sum(written)
    x: float = arr[7]
    head: list[float] = arr[0:2]
    counter = pp.Value("i", 0)
    new: int = counter.add(5)
    ok: bool = counter.compare_exchange(5, 6)
    value: int = counter.value
    raw = pp.RawArray(ctypes.c_double, 4)
    raw[0] = 2.5
    with pp.Lock():
        pass
    assert (total_written, x, head, new, ok, value, raw[0]) == (8, 7.0, [0.0, 1.0], 5, True, 6, 2.5)

    n: int = kernels.fib(20)
    sq: float = kernels.square(1.5)
    cubes: list[int] = kernels.cube_loop.map([10, 100], threads=2)
    token = kernels.CancelToken()
    token.cancel()
    try:
        kernels.fib(30, cancel=token)
    except kernels.KernelCancelled:
        pass
    print("kernels ok", n, sq, cubes)

    q = pp.Queue()
    q.put(("a", 1))
    item: object = q.get(timeout=5)
    left, right = pp.Pipe()
    left.send(item)
    assert right.recv() == ("a", 1)
    left.close()
    right.close()

    with ProcessPoolExecutor(max_workers=2) as ex:
        fut = ex.submit(square, 12)
        result: int = fut.result(timeout=30)
        mapped: list[float] = list(ex.map(add, [1, 2], [0.5, 0.5]))
    print("futures ok", result, mapped)

    results: list[pp.CommandResult] = pp.run_commands(["echo hi", "exit 3"], jobs=2)
    codes = [(r.returncode, r.ok) for r in results]
    assert codes == [(0, True), (3, False)], codes
    outputs: list[str | None] = [r.stdout for r in results]
    print("runner ok", outputs)

    for exc in (TaskCancelledError, WorkerLostError, pp.TaskTimeoutError):
        assert issubclass(exc, Exception)
    timeout_is_builtin: type[TimeoutError] = pp.TaskTimeoutError
    print("cpus", pp.cpu_count(), timeout_is_builtin.__name__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
