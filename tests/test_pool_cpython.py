"""Cases of CPython's own Pool tests (Lib/test/_test_multiprocessing.py) that pyparallel.Pool
failed before, in our own words, under every start method."""
import gc
import time
import warnings
import weakref

import pytest

import pyparallel as pp

pytestmark = pytest.mark.usefixtures("no_leaks")


class Counted:
    alive = 0

    def __init__(self):
        Counted.alive += 1

    def __del__(self):
        Counted.alive -= 1

    def __reduce__(self):
        return Counted, ()


def identity(x):
    return x


def test_finished_map_keeps_no_reference(pool_context):
    with pp.Pool(2, context=pool_context) as p:
        objs = [Counted() for _ in range(10)]
        refs = [weakref.ref(o) for o in objs]
        p.map(identity, objs)
        del objs
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (Counted.alive or any(r() for r in refs)):
            gc.collect()
            time.sleep(0.02)
        assert {r() for r in refs} == {None}
        assert Counted.alive == 0  # the copies that came back were released too


def test_bad_sizes_and_pool_list(pool_context):
    for bad in (-1, 0):
        with pytest.raises(ValueError):
            pp.Pool(bad, context=pool_context)
    p = pp.Pool(3, context=pool_context)
    try:
        assert len(p._pool) == 3
    finally:
        p.close()
        p.join()


def test_resource_warning_for_a_pool_left_running():
    p = pp.Pool(1)
    p.terminate()
    p.join()
    p._state = "RUN"  # as CPython's test forces it
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        p = None
        gc.collect()
    assert any("unclosed running multiprocessing pool" in str(x.message) for x in w)


class Raiser:
    @classmethod
    def _test_traceback(cls):
        raise RuntimeError(123)  # some comment


def test_traceback_of_a_classmethod_shows_its_source_line(pool_context):
    # CPython's test_traceback, its test class in a script's __main__: the class travels by
    # value and the classmethod it inherits too (cloudpickle finds no name for it); the
    # worker's traceback showed `File "<dynamic-code>"` and no source line
    Sub = type("Sub", (Raiser,), {"__module__": "__main__"})
    with pp.Pool(1, context=pool_context) as p:
        with pytest.raises(RuntimeError) as info:
            p.apply(Sub._test_traceback)
        with pytest.raises(RuntimeError) as info2:  # the function itself, by value
            p.apply(Raiser._test_traceback.__func__, (Raiser,))
    assert info.value.__cause__.tb == info2.value.__cause__.tb
    tb = info.value.__cause__.tb
    assert f'File "{__file__}", line ' in tb, tb
    assert "raise RuntimeError(123)  # some comment" in tb, tb
