"""pyparallel.kernels against pure-Python references: values, edge cases, errors, threads."""
import array
import fractions
import decimal
import functools
import math
import pickle
import threading

import pytest
from hypothesis import given, settings, strategies as st

from pyparallel import kernels
from pyparallel.kernels import cube_loop, fib, square, weighted_multiply, weighted_multiply_buffer

np = pytest.importorskip("numpy")


# ---- the pure-Python references: the spec ----

@functools.lru_cache(maxsize=None)
def ref_fib(n):  # the same recursion, memoised so the test is quick
    return 1 if n <= 2 else ref_fib(n - 1) + ref_fib(n - 2)


def ref_cube_loop(n):
    total = 0
    for i in range(n):
        total += i**3
    return total


def ref_square(x):
    return x * x


def ref_weighted_multiply(items, weights):
    return [(kind, number, number * weights[kind]) for kind, number in items]


def same_exception(fn_a, fn_b):
    """Both raise, and the same exception type."""
    with pytest.raises(Exception) as a:
        fn_a()
    with pytest.raises(Exception) as b:
        fn_b()
    assert type(a.value) is type(b.value), (a.value, b.value)
    return a.value


# ---- fib ----

@pytest.mark.parametrize("n", [-(10**30), -5, -1, 0, 1, 2, 3, 10, 25, 30, True, False])
def test_fib_edge_values(n):
    assert fib(n) == ref_fib(n)
    assert type(fib(n)) is int


def test_fib_known_value():
    assert fib(38) == 39088169


@given(st.integers(min_value=-(10**40), max_value=27))
@settings(max_examples=200, deadline=None)
def test_fib_matches_reference(n):
    assert fib(n) == ref_fib(n)


@pytest.mark.parametrize("n", [94, 1000, 10**30])
def test_fib_overflow(n):
    with pytest.raises(OverflowError):
        fib(n)


@pytest.mark.parametrize("bad", [1.5, 3.0, "7", None, [3], 2j])
def test_fib_wrong_type(bad):
    with pytest.raises(TypeError):
        fib(bad)


def test_fib_accepts_index_objects():
    class Idx:
        def __index__(self):
            return 20

    assert fib(Idx()) == ref_fib(20)
    assert fib(np.int64(21)) == ref_fib(21)


def test_fib_call_signature():
    with pytest.raises(TypeError):
        fib()
    with pytest.raises(TypeError):
        fib(1, 2)
    with pytest.raises(TypeError):
        fib(n=3)


@pytest.mark.parametrize("threads", [None, 1, 2, 3, 7])
def test_fib_map(threads):
    xs = list(range(-3, 30)) + [25, 1, 28]
    assert fib.map(xs, threads=threads) == [ref_fib(x) for x in xs]


def test_fib_map_inputs():
    assert fib.map([]) == []
    assert fib.map(x for x in (5, 6, 7)) == [5, 8, 13]
    assert fib.map((30,), 2) == [ref_fib(30)]
    assert fib.map(range(3)) == [1, 1, 1]


def test_fib_map_errors_come_before_any_work():
    # fib(80) would run for years: the bad item must be found before anything is computed.
    with pytest.raises(TypeError):
        fib.map([80, 81, "x"])
    with pytest.raises(OverflowError):
        fib.map([80, 81, 94])
    with pytest.raises(TypeError):
        fib.map(5)


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                     (True, TypeError), ("2", TypeError)])
def test_threads_argument(bad, exc):
    with pytest.raises(exc):
        fib.map([3], threads=bad)


def test_map_keyword_errors():
    with pytest.raises(TypeError):
        fib.map([3], thread=2)
    with pytest.raises(TypeError):
        fib.map([3], 2, threads=2)
    with pytest.raises(TypeError):
        fib.map()


# ---- cube_loop ----

@pytest.mark.parametrize("n", [-(10**30), -1, 0, 1, 2, 3, 1000, 123457, True, False])
def test_cube_loop_edge_values(n):
    assert cube_loop(n) == ref_cube_loop(n)


@given(st.integers(min_value=-50, max_value=5000))
@settings(max_examples=100, deadline=None)
def test_cube_loop_matches_reference(n):
    assert cube_loop(n) == ref_cube_loop(n)


def test_cube_loop_exact_beyond_128_bits():
    # The sum passes 2**128 near n = 2**32.5; check the closed form there without looping
    # for minutes: the kernel's 192-bit accumulator must carry correctly, so check a size
    # whose cubes overflow 64 bits (i > 2**21) and a closed form of sum(i**3) = (n(n-1)/2)**2.
    n = 3_000_000
    assert cube_loop(n) == (n * (n - 1) // 2) ** 2
    assert cube_loop(n) > 2**64


def test_cube_loop_errors():
    with pytest.raises(OverflowError):
        cube_loop(2**42 + 1)
    with pytest.raises(TypeError):
        cube_loop(10.0)
    with pytest.raises(TypeError):
        cube_loop.map([10, None])


def test_cube_loop_map():
    xs = [0, 5, 100_000, -3, 30_000, 7]
    for threads in (1, 2, 4):
        assert cube_loop.map(xs, threads=threads) == [ref_cube_loop(x) for x in xs]
    assert cube_loop.map([]) == []


# ---- square ----

@pytest.mark.parametrize("x", [0, 1, -1, True, False, 3037000499, 3037000500, -(2**63), 2**63,
                               10**30, -(10**30), 2.5, -0.0, 1e200, float("inf"),
                               fractions.Fraction(3, 7), decimal.Decimal("1.1"), 3 + 4j])
def test_square_values(x):
    r, e = square(x), ref_square(x)
    assert r == e and type(r) is type(e)


def test_square_nan():
    assert math.isnan(square(float("nan")))


@given(st.one_of(st.integers(), st.floats(allow_nan=False)))
def test_square_matches_reference(x):
    r = square(x)
    assert r == ref_square(x) and type(r) is type(ref_square(x))


@pytest.mark.parametrize("bad", ["a", None, [1], object()])
def test_square_wrong_type_same_exception(bad):
    same_exception(lambda: square(bad), lambda: ref_square(bad))


def test_square_map():
    xs = [1, 2.0, 10**20, 3, True, fractions.Fraction(1, 3), -7]
    assert square.map(xs) == [ref_square(x) for x in xs]
    big = list(range(-100_000, 100_000)) + [1.5] * 1000 + [2**40]
    assert square.map(big, threads=2) == [x * x for x in big]
    assert square.map([]) == []
    with pytest.raises(TypeError):
        square.map([1, 2, "x"])


# ---- weighted_multiply ----

ITEMS = [("type1", i) for i in range(1, 10)] + [("type2", i) for i in range(1, 10)]
WEIGHTS = {"type1": 2, "type2": 3}


def test_weighted_multiply_issue_example():
    out = weighted_multiply(ITEMS, WEIGHTS)
    assert out[0] == ("type1", 1, 2) and out[-1] == ("type2", 9, 27)
    assert out == ref_weighted_multiply(ITEMS, WEIGHTS)
    assert weighted_multiply.map(ITEMS, WEIGHTS, threads=2) == out


numbers = st.one_of(st.integers(), st.floats(allow_nan=False), st.fractions())


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), numbers), max_size=50),
       st.fixed_dictionaries({"a": numbers, "b": numbers, "c": numbers}))
@settings(max_examples=150, deadline=None)
def test_weighted_multiply_matches_reference(items, weights):
    # repr: equal values of equal types, and nan (inf * 0) compares equal to nan
    expected = repr(ref_weighted_multiply(items, weights))
    assert repr(weighted_multiply(items, weights)) == expected
    assert repr(weighted_multiply.map(iter(items), weights, threads=3)) == expected


def test_weighted_multiply_large_parallel():
    items = [("k%d" % (i % 7), i if i % 3 else i * 0.5) for i in range(200_000)]
    weights = {"k%d" % j: j + 1 for j in range(7)}
    weights["k3"] = 2**62  # products overflow int64: Python ints must come out
    assert weighted_multiply.map(items, weights, threads=2) == ref_weighted_multiply(items, weights)


def test_weighted_multiply_keeps_identity():
    n = 10**40
    out = weighted_multiply([("a", n)], {"a": 1})
    assert out[0][1] is n


@pytest.mark.parametrize("items", [
    [("type1", 1), ("nope", 2)],           # KeyError
    [("type1", 1, 3)],                     # ValueError: too many values
    [("type1",)],                          # ValueError: not enough values
    [5],                                   # TypeError: cannot unpack
    [("type1", "x")],                      # valid: "x" * 2 == "xx"
    5,                                     # TypeError: not iterable
])
def test_weighted_multiply_errors_match_python(items):
    try:
        expected = ref_weighted_multiply(items, WEIGHTS)
    except Exception as e:
        exc = same_exception(lambda: weighted_multiply(items, WEIGHTS),
                             lambda: ref_weighted_multiply(items, WEIGHTS))
        assert type(exc) is type(e)
        with pytest.raises(type(e)):
            weighted_multiply.map(items, WEIGHTS)
    else:  # ("type1", "x") is valid Python: "x" * 2 == "xx"
        assert weighted_multiply(items, WEIGHTS) == expected


def test_weighted_multiply_generic_iterables_and_mappings():
    class Weights:
        def __getitem__(self, key):
            return len(key)

    items = iter([["ab", 2], iter(("abc", 3))])
    assert weighted_multiply(items, Weights()) == [("ab", 2, 4), ("abc", 3, 9)]
    with pytest.raises(ValueError):
        weighted_multiply([iter(("a", 1, 2))], WEIGHTS)


# ---- weighted_multiply_buffer ----

def test_buffer_array_array():
    a = array.array("q", [1, 2, 3])
    assert weighted_multiply_buffer(a, array.array("q", [4, 5, 6])) == array.array("q", [4, 10, 18])
    r = weighted_multiply_buffer(a, array.array("d", [0.5, 0.5, 0.5]))
    assert r == array.array("d", [0.5, 1.0, 1.5])


@pytest.mark.parametrize("n", [0, 1, 1000, 100_000])
@pytest.mark.parametrize("da,db", [("int64", "int64"), ("int64", "float64"),
                                   ("float64", "float64"), ("float64", "int64")])
def test_buffer_numpy(n, da, db):
    rng = np.random.default_rng(n)
    a = rng.integers(-1000, 1000, n).astype(da)
    b = rng.integers(-1000, 1000, n).astype(db)
    r = weighted_multiply_buffer(a, b, threads=2)
    assert isinstance(r, np.ndarray) and r.dtype == (a * b).dtype
    np.testing.assert_array_equal(r, a * b)


def test_buffer_out_and_in_place():
    a = np.arange(50_000, dtype=np.float64)
    out = np.empty_like(a)
    assert weighted_multiply_buffer(a, a, out=out) is out
    np.testing.assert_array_equal(out, a * a)
    weighted_multiply_buffer(a, a, out=a)
    np.testing.assert_array_equal(a, out)


def test_buffer_errors():
    a = np.arange(10, dtype=np.int64)
    with pytest.raises(ValueError):
        weighted_multiply_buffer(a, np.arange(11, dtype=np.int64))
    with pytest.raises(ValueError):
        weighted_multiply_buffer(a, a, out=np.empty(9, dtype=np.int64))
    with pytest.raises(TypeError):
        weighted_multiply_buffer(a.astype(np.int32), a)
    with pytest.raises(TypeError):
        weighted_multiply_buffer([1, 2], [3, 4])
    with pytest.raises(TypeError):  # int inputs, float out
        weighted_multiply_buffer(a, a, out=np.empty(10))
    with pytest.raises(BufferError):  # read-only out
        weighted_multiply_buffer(a, a, out=bytes(80))
    with pytest.raises(ValueError):
        weighted_multiply_buffer(a, a, threads=0)


# ---- objects ----

@pytest.mark.parametrize("k", [fib, cube_loop, square, weighted_multiply])
def test_kernel_objects(k):
    assert isinstance(k, kernels.Kernel)
    assert pickle.loads(pickle.dumps(k)) is k
    assert k.__name__ in repr(k) and k.__doc__
    assert k.unary == (k is not weighted_multiply)


def test_kernel_type_cannot_be_instantiated():
    with pytest.raises(TypeError):
        kernels.Kernel()


def test_openmp_flag_says_whether_an_openmp_runtime_is_linked():
    with open("/proc/self/maps") as f:
        mapped = any("libgomp" in line for line in f)
    assert type(kernels.openmp) is bool
    assert kernels.openmp == mapped


# ---- the GIL is released ----

def _progress_while(fn):
    """Iterations this thread completes while another thread runs fn()."""
    started, done = threading.Event(), threading.Event()
    box = {}

    def target():
        started.set()
        box["result"] = fn()
        done.set()

    t = threading.Thread(target=target)
    t.start()
    started.wait()
    count = 0
    while not done.is_set():
        count += 1
    t.join()
    return count, box["result"]


def test_scalar_kernel_releases_the_gil():
    # While the other thread is inside fib(40) (a quarter second or more), this thread keeps
    # running Python. Were the GIL held, it could not run until the call returned.
    count, result = _progress_while(lambda: fib(40))
    assert result == ref_fib(40)
    assert count > 10_000


def test_bulk_kernel_releases_the_gil():
    count, result = _progress_while(lambda: fib.map([38, 38, 38, 38], threads=2))
    assert result == [ref_fib(38)] * 4
    assert count > 10_000


# ---- inputs changed by Python code during conversion (issue 8, point 1) ----
# Each case crashed (exit 139) when the C code re-read the caller's list after running
# Python code; the inputs are now a snapshot, so the result is that of the snapshot (but
# weighted_multiply reads a list live, as the comprehension does). They
# run in a subprocess so that a regression fails the test instead of killing pytest.

MUTATION_PRELUDE = '''
import faulthandler; faulthandler.disable()
from pyparallel import _core
from pyparallel.kernels import cube_loop, fib, square, weighted_multiply
class ClearsOnIndex:
    def __init__(self, lst, v): self.lst, self.v = lst, v
    def __index__(self): self.lst.clear(); return self.v
class ClearsOnMul:
    def __init__(self, lst, v): self.lst, self.v = lst, v
    def __mul__(self, other): self.lst.clear(); return self.v * self.v
class ClearingWeights(dict):
    def __init__(self, lst): super().__init__(a=2, b=3); self.lst = lst
    def __getitem__(self, k): self.lst.clear(); return dict.__getitem__(self, k)
class ClearsOnFileno:
    def __init__(self, lst, fd): self.lst, self.fd = lst, fd
    def fileno(self): self.lst.clear(); return self.fd
'''

MUTATION_CASES = {
    "fib.map": ("xs = [0, 0, 20, 21]; xs[0] = ClearsOnIndex(xs, 10); print(fib.map(xs))",
                "[55, 1, 6765, 10946]"),
    "fib.map-threads": ("xs = [0] + [25] * 64; xs[0] = ClearsOnIndex(xs, 25); "
                        "print(fib.map(xs, threads=4) == [75025] * 65)", "True"),
    "cube_loop.map": ("xs = [0, 5, 6]; xs[0] = ClearsOnIndex(xs, 4); print(cube_loop.map(xs))",
                      "[36, 100, 225]"),
    "square.map": ("xs = [0, 3, 2.5, 10**30]; xs[0] = ClearsOnMul(xs, 7); print(square.map(xs))",
                   "[49, 9, 6.25, %d]" % 10**60),
    "square.map-large": ("xs = [0] + list(range(100_000)); xs[0] = ClearsOnMul(xs, 7); "
                         "r = square.map(xs, threads=2); print(r[0], r[-1], len(r))",
                         "49 9999800001 100001"),
    # weighted_multiply reads a list live, as the comprehension it replaces does: the result
    # is the comprehension's, computed in the same process on a fresh copy
    "weighted_multiply": ("items = [('a', 1), ('b', 2), ('a', 3)]; "
                          "r = weighted_multiply(items, ClearingWeights(items)); "
                          "items = [('a', 1), ('b', 2), ('a', 3)]; w = ClearingWeights(items); "
                          "print(r, r == [(k, n, n * w[k]) for k, n in items])",
                          "[('a', 1, 2)] True"),
    "weighted_multiply.map": ("items = [('a', 1), ('b', 2), ('a', 3)]; "
                              "r = weighted_multiply.map(items, ClearingWeights(items), threads=2); "
                              "print(r)", "[('a', 1, 2)]"),
    "weighted_multiply-index": ("items = [('a', 0), ('b', 2)]; items[0] = ('a', ClearsOnMul(items, 4)); "
                                "r = weighted_multiply(items, {'a': 5, 'b': 3}); "
                                "print(len(r), r[0][2])", "1 16"),
    "weighted_multiply-tuple": ("items = [('a', 0), ('b', 2)]; items[0] = ('a', ClearsOnMul(items, 4)); "
                                "print(weighted_multiply(tuple(items), {'a': 5, 'b': 3})[1])",
                                "('b', 2, 6)"),
    "weighted_multiply-grows": ("items = [('a', 1)]\n"
                                "class Grows(dict):\n"
                                "    def __getitem__(self, k):\n"
                                "        if len(items) < 5000: items.append(('b', len(items)))\n"
                                "        return dict.__getitem__(self, k)\n"
                                "r = weighted_multiply(items, Grows(a=2, b=3))\n"
                                "print(len(r), r[-1], r == [(k, n, n * (2 if k == 'a' else 3)) "
                                "for k, n in items])", "5000 ('b', 4999, 14997) True"),
    "Channel.wait": ("import os; ch = _core.Channel(1, 4096, 4096); r, w = os.pipe(); "
                     "os.write(w, b'x'); fds = [0, r, r]; fds[0] = ClearsOnFileno(fds, r); "
                     "print(ch.wait(fds, 5)); ch.close()", "True"),
}


@pytest.mark.parametrize("case", sorted(MUTATION_CASES))
def test_input_changed_during_conversion(case):
    import subprocess
    import sys
    code, expected = MUTATION_CASES[case]
    out = subprocess.run([sys.executable, "-c", MUTATION_PRELUDE + code], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip() == expected


def test_pack_numbers_runs_no_python_code():
    # codec.c reads the list without a snapshot: that is safe only because it runs no Python
    # code (exact ints and floats only); an int subclass with a mutating __index__ is refused.
    class Evil(int):
        def __index__(self):
            raise AssertionError("pack_numbers ran Python code")
    from pyparallel import _core
    assert _core.pack_numbers([1, Evil(2), 3]) is None
    assert _core.pack_numbers([1.5, 2.5]) == ("d", array.array("d", [1.5, 2.5]).tobytes())


def test_slice_assignment_from_a_mutating_sequence():
    # SynchronizedArray[...] = seq goes through ctypes, which reads seq by index, bounds-checked.
    import pyparallel as pp
    arr = pp.Array("i", 4)

    class Shrinks(list):
        def __getitem__(self, i):
            v = list.__getitem__(self, i)
            self.clear()
            return v

    with pytest.raises(IndexError):           # as multiprocessing.Array: the list's own error
        arr[0:3] = Shrinks([1, 2, 3])
    assert arr[0] == 1 and arr[1:4] == [0, 0, 0]


# ---- weighted_multiply_buffer with `out` overlapping an input: numpy's results ----

@pytest.mark.parametrize("n", [10, 100_000])
@pytest.mark.parametrize("shift", [1, -1, 3])
def test_weighted_multiply_buffer_overlap_like_numpy(n, shift):
    base = np.arange(n + 3, dtype=np.int64) + 1
    ref = base.copy()
    w = (np.arange(n, dtype=np.int64) % 7) + 2
    lo, hi = (0, shift) if shift > 0 else (-shift, 0)
    weighted_multiply_buffer(base[lo:lo + n], w, out=base[hi:hi + n], threads=2)
    np.multiply(ref[lo:lo + n], w, out=ref[hi:hi + n])
    assert np.array_equal(base, ref)


def test_weighted_multiply_buffer_in_place_and_both_inputs():
    a = np.arange(1, 70_001, dtype=np.float64)
    ref = a * a
    weighted_multiply_buffer(a, a, out=a, threads=2)      # the same buffer three times
    assert np.array_equal(a, ref)
    b = np.arange(12, dtype=np.int64)
    ref = b.copy()
    weighted_multiply_buffer(b[2:], b[:-2], out=b[1:-1])  # out overlaps both, differently
    np.multiply(ref[2:], ref[:-2], out=ref[1:-1])
    assert np.array_equal(b, ref)


# ---- weighted_multiply: its fast paths give the list comprehension's results ----

def test_weighted_multiply_many_kinds_and_int_keys():
    items = [(f"k{i % 23}", i) for i in range(50_000)] + [(i % 5, i) for i in range(20_000)]
    weights = {f"k{j}": j * 1.5 for j in range(23)}
    weights.update({j: j - 2 for j in range(5)})
    got = weighted_multiply(items, weights)
    assert got == ref_weighted_multiply(items, weights)
    assert weighted_multiply.map(items, weights, threads=2) == got
    assert all(type(t) is tuple and len(t) == 3 for t in got)


def test_weighted_multiply_looks_up_a_mapping_per_item():
    class Counting(dict):
        calls = 0

        def __getitem__(self, k):
            Counting.calls += 1
            return dict.__getitem__(self, k) + Counting.calls

    items = [("a", 1)] * 20_000
    got = weighted_multiply(items, Counting(a=0))
    assert Counting.calls == 20_000 and got[-1] == ("a", 1, 20_000)


def test_weighted_multiply_products_in_list_comprehension_order():
    # A number whose __mul__ changes the weights: later items see the new weights, as in
    # the comprehension, even within one block of the kernel's.
    weights = {"a": 2, "b": 3}

    class Bump:
        def __mul__(self, w):
            weights["a"] = 100
            return w

    items = [("a", 1), ("a", 2), ("b", Bump()), ("a", 3), ("a", 4)] * 3
    expected = ref_weighted_multiply(items, weights)
    weights.update(a=2, b=3)
    got = weighted_multiply(items, weights)
    assert [t[2] for t in got] == [t[2] for t in expected] == [2, 4, 3, 300, 400] + [100, 200, 3, 300, 400] * 2


def test_weighted_multiply_result_is_collectable():
    import gc

    items = [("a", [])] * 3  # lists: the result tuples hold containers and stay tracked
    got = weighted_multiply(items, {"a": 2})
    assert got == [("a", [], [])] * 3 and gc.is_tracked(got) and gc.is_tracked(got[0])
    plain = weighted_multiply([("a", 1)] * 10, {"a": 2})
    assert gc.is_tracked(plain) and not gc.is_tracked(plain[0])  # as the collector would leave it
    t = (("a", []),)  # a tuple given is used as it is, and left tracked
    assert gc.is_tracked(t)
    weighted_multiply(t, {"a": 2})
    assert gc.is_tracked(t)
