"""Native kernels: the CPU-bound examples people learn parallelism with, in C.

Each kernel is a callable object: ``fib(35)`` computes with the GIL released, so several
Python threads calling kernels run in parallel; ``fib.map(xs, threads=None)`` converts every
input first (raising what the Python version would raise, before any thread starts), then
runs one thread team (OpenMP when the build has it, see :data:`openmp`) with dynamic
scheduling, largest inputs first, and returns a list in input order.

``threads`` is capped at the number of inputs and at 4 per usable CPU (1024 at most): more
threads than that only add switching, and ``threads=10**6`` does not start a million.

Kernels are fork-safe: the team lives on its own long-lived pthread (never a Python thread),
and an idle team is taken down just before any ``fork()`` and restarted by the next call, so a
forked child never inherits a GNU OpenMP pool it would deadlock on, and Python 3.12+ sees no
thread of ours when it checks whether the process forking is multi-threaded.

Interruption: Ctrl-C (SIGINT, also the Jupyter interrupt) stops a running kernel call, scalar
or ``.map``, within about 10 ms of computing time, and raises KeyboardInterrupt; the next call
works as usual. A :class:`CancelToken` does the same from any thread: pass ``cancel=token`` to
a kernel call, to ``kernel.map(...)`` or to :func:`weighted_multiply_buffer`, and
``token.cancel()`` stops them with :exc:`KernelCancelled` (a RuntimeError); a call given an
already cancelled token raises at once, before any work. A token stays cancelled.

Inputs are read once, as a snapshot (a tuple of the list's items), before any conversion:
Python code run while converting (``__index__``, ``__mul__``, a weights mapping's
``__getitem__``) may change the caller's list without affecting the call.
"""
from __future__ import annotations

import array

from . import _core
from ._core import CancelToken, Kernel, KernelCancelled, cube_loop, fib, square, weighted_multiply

__all__ = [
    "Kernel",
    "CancelToken",
    "KernelCancelled",
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


def weighted_multiply_buffer(numbers, weights, out=None, threads=None, *, cancel=None):
    """``out[i] = numbers[i] * weights[i]`` over equal-length buffers of int64 or float64
    (array.array, numpy arrays, any C-contiguous buffer), on a thread team.

    The result is int64 when both inputs are, float64 otherwise; int64 products wrap on
    overflow, as numpy's do. Without ``out`` a new array is returned: a numpy array when
    ``numbers`` is one, else an ``array.array``. ``out`` may overlap the inputs: the result is
    numpy's (computed from the inputs as they were before the call). ``cancel``: a
    :class:`CancelToken` that stops the call (KernelCancelled).
    """
    if cancel is not None and not isinstance(cancel, CancelToken):
        raise TypeError(f"cancel must be None or a CancelToken, not {type(cancel).__name__}")
    kind = "d" if "d" in (_kind(numbers, "numbers"), _kind(weights, "weights")) else "q"
    if out is None:
        n = memoryview(numbers).nbytes // 8
        if type(numbers).__module__ == "numpy" and hasattr(numbers, "shape"):
            import numpy

            out = numpy.empty(numbers.shape, dtype=numpy.float64 if kind == "d" else numpy.int64)
        else:
            out = array.array(kind, bytes(8 * n))
    return _core._weighted_multiply_buffer(numbers, weights, out, threads, cancel=cancel)
