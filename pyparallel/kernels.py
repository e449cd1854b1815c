"""Native kernels: the CPU-bound examples people learn parallelism with, in C.

Each kernel is a callable object: ``fib(35)`` computes with the GIL released, so several
Python threads calling kernels run in parallel; ``fib.map(xs, threads=None)`` converts every
input first (raising what the Python version would raise, before any thread starts), then
runs one thread team (OpenMP when the build has it, see :data:`openmp`) with dynamic
scheduling, largest inputs first, and returns a list in input order.

Kernels are fork-safe: a thread team is started from a short-lived thread that takes it down
again, so a process forked after a kernel ran (``os.fork``, multiprocessing's fork start
method) never inherits a GNU OpenMP pool it would deadlock on.
"""
from __future__ import annotations

import array

from . import _core
from ._core import Kernel, cube_loop, fib, square, weighted_multiply

__all__ = [
    "Kernel",
    "fib",
    "cube_loop",
    "square",
    "weighted_multiply",
    "weighted_multiply_buffer",
    "openmp",
]

#: True when the thread teams are OpenMP; False when the build fell back to pthreads.
openmp: bool = _core.HAVE_OPENMP

_KINDS = {"q": "q", "l": "q", "d": "d"}


def _kind(buf, name: str) -> str:
    fmt = memoryview(buf).format.lstrip("@=<")
    if memoryview(buf).itemsize != 8 or fmt not in _KINDS:
        raise TypeError(f"{name} must be a buffer of int64 or float64, not format {fmt!r}")
    return _KINDS[fmt]


def weighted_multiply_buffer(numbers, weights, out=None, threads=None):
    """``out[i] = numbers[i] * weights[i]`` over equal-length buffers of int64 or float64
    (array.array, numpy arrays, any C-contiguous buffer), on a thread team.

    The result is int64 when both inputs are, float64 otherwise; int64 products wrap on
    overflow, as numpy's do. Without ``out`` a new array is returned: a numpy array when
    ``numbers`` is one, else an ``array.array``.
    """
    kind = "d" if "d" in (_kind(numbers, "numbers"), _kind(weights, "weights")) else "q"
    if out is None:
        n = memoryview(numbers).nbytes // 8
        if type(numbers).__module__ == "numpy" and hasattr(numbers, "shape"):
            import numpy

            out = numpy.empty(numbers.shape, dtype=numpy.float64 if kind == "d" else numpy.int64)
        else:
            out = array.array(kind, bytes(8 * n))
    return _core._weighted_multiply_buffer(numbers, weights, out, threads)
