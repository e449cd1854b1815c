"""Leak gates: call each kernel API (success and error paths) many times after a warm-up and
fail if memory traced by tracemalloc (every PyMem/PyObject allocation) keeps growing."""
import array
import gc
import tracemalloc

import pytest

from pyparallel import kernels

ITEMS = [("a", 1), ("b", 2.5), ("a", 10**30), ("b", 3)]
W = {"a": 2, "b": 3}
A = array.array("q", range(1000))
OUT = array.array("q", bytes(8000))


def raises(fn, exc):
    def call():
        try:
            fn()
        except exc:
            return
        raise AssertionError("did not raise")
    return call


CASES = {
    "fib": lambda: kernels.fib(20),
    "fib.map": lambda: kernels.fib.map([20, 21, -1, True], threads=2),
    "fib overflow": raises(lambda: kernels.fib(100), OverflowError),
    "fib.map bad item": raises(lambda: kernels.fib.map([3, "x"]), TypeError),
    "cube_loop": lambda: kernels.cube_loop(3_000_000 // 1000),
    "cube_loop.map": lambda: kernels.cube_loop.map([10, 30_000], threads=2),
    "square": lambda: (kernels.square(3), kernels.square(2.5), kernels.square(10**40)),
    "square.map": lambda: kernels.square.map([1, 2.0, 10**40]),
    "square bad": raises(lambda: kernels.square("x"), TypeError),
    "weighted_multiply": lambda: kernels.weighted_multiply(ITEMS, W),
    "weighted_multiply.map": lambda: kernels.weighted_multiply.map(iter(ITEMS), W, threads=2),
    "weighted_multiply KeyError": raises(lambda: kernels.weighted_multiply(ITEMS + [("z", 1)], W), KeyError),
    "weighted_multiply unpack": raises(lambda: kernels.weighted_multiply([iter((1, 2, 3))], W), ValueError),
    "buffer": lambda: kernels.weighted_multiply_buffer(A, A, out=OUT),
    "buffer mismatch": raises(lambda: kernels.weighted_multiply_buffer(A, A[:10], out=OUT), ValueError),
    "threads bad": raises(lambda: kernels.fib.map([1], threads=0), ValueError),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_growth(name):
    fn = CASES[name]
    for _ in range(200):
        fn()
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(2000):
            fn()
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(4000):
            fn()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A leak of even one small object per call would add well over 4000 * 16 bytes.
    assert after - before < 16_000, f"{name}: grew by {after - before} bytes over 4000 calls"
