"""pyparallel.shared in one process: multiprocessing's documented behaviour for every type,
the same exceptions for the same bad input, atomics, zero-copy buffers, pickling by handle."""
import contextlib
import ctypes
import errno
import gc
import multiprocessing as mp
import multiprocessing.sharedctypes  # noqa: F401
import os
import pickle
import tempfile
import threading
import time

import numpy as np
import pytest

import pyparallel as pp
from pyparallel import shared
from _util import memfd_count as _memfds


# ------------------------------------------------------------------------------------------
# Value / Array / RawValue / RawArray mirror multiprocessing

@pytest.mark.parametrize("code", list("bBhHiIlLqQfd"))
def test_value_zero_and_set(code):
    v, m = pp.Value(code), mp.Value(code)
    assert v.value == m.value == 0
    v.value = m.value = 7
    assert v.value == m.value == 7
    assert type(v.get_obj()).__mro__[1] is type(m.get_obj())


@pytest.mark.parametrize("t", [ctypes.c_int, ctypes.c_double, ctypes.c_ubyte, ctypes.c_longlong])
def test_ctypes_types_accepted(t):
    v = pp.Value(t, 3)
    a = pp.Array(t, [1, 2, 3])
    assert v.value == 3 and list(a) == [1, 2, 3]
    assert isinstance(pp.RawValue(t), t)


def test_array_sequence_slicing_len():
    a, m = pp.Array("i", [1, 2, 3, 4]), mp.Array("i", [1, 2, 3, 4])
    assert len(a) == len(m) == 4
    assert a[:] == m[:] and a[1:3] == m[1:3] and a[-1] == m[-1]
    a[1:3] = [9, 9]
    m[1:3] = [9, 9]
    assert a[:] == m[:]
    assert pp.Array("d", 3)[:] == [0.0] * 3


def test_char_array_value_raw():
    s, m = pp.Array("c", b"hello"), mp.Array("c", b"hello")
    assert s.value == m.value == b"hello" and s.raw == m.raw
    s.value = b"hi"
    m.value = b"hi"
    assert s.raw == m.raw
    assert isinstance(s, shared.SynchronizedString)


def test_lock_variants():
    raw = pp.Value("i", 1, lock=False)
    assert isinstance(raw, ctypes.c_int) and not hasattr(raw, "get_lock")
    assert isinstance(pp.Array("i", 3, lock=False), ctypes.Array)
    lk = pp.Lock()
    v = pp.Value("i", 1, lock=lk)
    assert v.get_lock() is lk
    assert isinstance(pp.Value("i").get_lock(), pp.RLock)
    with v:
        assert lk._is_mine()
    assert not lk._is_mine()


def test_copy_and_synchronized_like_sharedctypes():
    r = pp.RawArray("i", [1, 2, 3])
    c = shared.copy(r)
    c[0] = 9
    assert r[:] == [1, 2, 3] and c[:] == [9, 2, 3]
    assert pickle.loads(pickle.dumps(c))[:] == [9, 2, 3]
    s = shared.synchronized(c)
    assert isinstance(s, shared.SynchronizedArray) and s[0] == 9
    with pytest.raises(TypeError):
        shared.synchronized(ctypes.c_int(1))   # not in shared memory


def test_raw_are_ctypes():
    r = pp.RawArray("d", 4)
    assert isinstance(r, ctypes.Array) and r._length_ == 4 and r[:] == [0.0] * 4
    rv = pp.RawValue("i", 5)
    assert isinstance(rv, ctypes.c_int) and rv.value == 5


class Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_double), ("y", ctypes.c_double)]


def test_synchronized_structure_fields():
    p = pp.Value(Point, 1.0, 2.0)
    assert (p.x, p.y) == (1.0, 2.0)
    p.x = 3.0
    q = pickle.loads(pickle.dumps(p))
    assert q.x == 3.0 and q.get_lock() is not None and type(q) is type(p)


def test_structure_value_pickles():
    p = pp.RawValue(Point, 1.0, 2.0)
    q = pickle.loads(pickle.dumps(p))
    q.x = 5.0
    assert p.x == 5.0 and p.y == 2.0


def _exc(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e)
    return None


BAD = [
    ("unknown typecode", lambda M: M.Value("z")),
    ("unknown array typecode", lambda M: M.RawArray("z", 3)),
    ("negative size", lambda M: M.RawArray("i", -1)),
    ("absurd size", lambda M: M.RawArray("i", 10**20)),
    ("wrong init type", lambda M: M.Array("i", [1, "a"])),
    ("wrong value type", lambda M: M.Value("i", "x")),
    ("index get", lambda M: M.Array("i", 3)[5]),
    ("index set", lambda M: M.Array("i", 3).__setitem__(5, 1)),
    ("bad item type", lambda M: M.Array("i", 3).__setitem__(0, "x")),
    ("bad slice size", lambda M: M.Array("i", 3).__setitem__(slice(0, 2), [1])),
    ("float into int value", lambda M: setattr(M.Value("i"), "value", 1.5)),
    ("lock without acquire", lambda M: M.Value("i", 0, lock=42)),
    ("over-released lock", lambda M: M.Lock().release()),
    ("unowned rlock", lambda M: M.RLock().release()),
    ("over-released bounded", lambda M: M.BoundedSemaphore(1).release()),
    ("negative semaphore", lambda M: M.Semaphore(-1)),
]


@pytest.mark.parametrize("name,fn", BAD, ids=[b[0] for b in BAD])
def test_bad_input_same_exception_as_multiprocessing(name, fn):
    expected = _exc(lambda: fn(mp))
    assert expected is not None, name
    assert _exc(lambda: fn(pp)) is expected


def test_bad_input_leaks_nothing():
    gc.collect()
    before = _memfds()
    for _, fn in BAD:
        _exc(lambda: fn(pp))
    gc.collect()
    assert _memfds() <= before + 1  # at most a new current arena


# ------------------------------------------------------------------------------------------
# Atomics

@pytest.mark.parametrize("code", list("bBhHiIlLqQ"))
def test_atomic_ops(code):
    v = pp.Value(code, 5)
    assert v.add(3) == 8 and v.fetch_add(2) == 8 and v.load() == 10
    assert v.sub(4) == 6 and v.fetch_sub(1) == 6 and v.value == 5
    assert v.exchange(1) == 5
    assert v.compare_exchange(1, 2) is True and v.compare_exchange(1, 3) is False
    assert v.value == 2
    v.store(0)
    assert v.value == 0
    with pytest.raises(OverflowError):
        v.add(1 << 70)
    with pytest.raises(TypeError):
        v.add(1.5)


@pytest.mark.parametrize("code", list("bBhHiIlLqQ"))
@pytest.mark.parametrize("op", ["add", "fetch_add", "sub", "fetch_sub"])
def test_atomic_overflow_raises_and_leaves_the_item(code, op):
    import array

    bits = array.array(code).itemsize * 8
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if code.islower() else (0, 2**bits - 1)
    edge = hi if "add" in op else lo
    for make, args in ((pp.Value, ()), (pp.RawValue, ()), (pp.Array, (1,)), (pp.RawArray, (1,))):
        obj = make(code, [0, edge, 0]) if args else make(code, edge)
        with pytest.raises(OverflowError, match="does not fit"):
            getattr(obj, op)(*args, 1)
        assert (obj[1] if args else obj.value) == edge      # unchanged
        assert getattr(obj, op)(*args, 0) == edge            # a delta that fits still works
    if code.islower():                                      # a negative delta, the other way
        v = pp.Value(code, lo if op in ("add", "fetch_add") else hi)
        with pytest.raises(OverflowError):
            getattr(v, op)(-1)
        assert v.value == (lo if op in ("add", "fetch_add") else hi)


def test_array_atomics_index():
    a = pp.Array("q", 4)
    assert a.add(2, 5) == 5 and a.add(-2, 1) == 6 and a[:] == [0, 0, 6, 0]
    with pytest.raises(IndexError):
        a.add(4, 1)
    with pytest.raises(TypeError):
        a.add(1)
    r = pp.RawArray("i", 3)
    assert r.fetch_add(0, 2) == 0 and r[0] == 2


def test_float_atomics_load_store_only():
    d = pp.Value("d", 1.5)
    assert d.load() == 1.5
    d.store(2.5)
    assert d.value == 2.5 and d.exchange(1.0) == 2.5
    with pytest.raises(TypeError):
        d.add(1)


def test_atomic_add_threads_exact():
    v = pp.Value("q", 0)

    def work():
        for _ in range(20000):
            v.add(1)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert v.value == 80000


# ------------------------------------------------------------------------------------------
# Buffer protocol: zero-copy

def test_numpy_zero_copy_array_and_raw():
    a = pp.Array("d", 10)
    n = np.asarray(a)
    assert n.dtype == np.float64 and n.shape == (10,)
    n[3] = 4.5
    assert a[3] == 4.5
    a[4] = 1.25
    assert n[4] == 1.25
    r = pp.RawArray("i", 5)
    nr = np.asarray(r)
    nr[:] = 7
    assert r[:] == [7] * 5
    m = memoryview(a)
    assert m.format == "d" and m.shape == (10,) and not m.readonly


def test_value_buffer_is_0d():
    v = pp.Value("i", 3)
    m = memoryview(v)
    assert m.ndim == 0 and m.tolist() == 3
    np.asarray(v)[()] = 9
    assert v.value == 9


# ------------------------------------------------------------------------------------------
# Locks and semaphores

def test_lock_semantics():
    lk = pp.Lock()
    assert lk.acquire() is True
    assert lk.acquire(False) is False
    t0 = time.monotonic()
    assert lk.acquire(timeout=0.1) is False
    assert time.monotonic() - t0 >= 0.09
    assert lk.acquire(True, -1) is False   # negative timeout is 0, as multiprocessing
    lk.release()
    with lk:
        pass
    with pytest.raises(ValueError):
        lk.release()
    lk.acquire()
    threading.Timer(0.05, lk.release).start()
    assert lk.acquire(timeout=1e300) is True    # huge timeouts mean "forever", no overflow
    with pytest.raises(ValueError):
        lk.acquire(timeout=float("nan"))
    with pytest.raises(TypeError):
        lk.acquire(timeout="1")
    with pytest.raises(TypeError):
        lk.acquire(True, 1, 2)
    lk.release()
    assert lk.acquire(block=False, timeout=5) is True   # timeout ignored when not blocking
    lk.release()


def test_lock_release_by_other_thread_allowed():
    lk = pp.Lock()
    lk.acquire()
    t = threading.Thread(target=lk.release)
    t.start()
    t.join()
    assert lk.acquire(False)


def test_rlock_semantics():
    r = pp.RLock()
    assert r.acquire() and r.acquire() and r._count() == 2
    errs = []

    def other():
        errs.append(r.acquire(timeout=0.05))
        try:
            r.release()
        except AssertionError:
            errs.append("assert")

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errs == [False, "assert"]
    r.release()
    r.release()
    with pytest.raises(AssertionError):
        r.release()


def test_semaphores():
    s = pp.Semaphore(2)
    assert s.get_value() == 2 and s.acquire() and s.acquire() and not s.acquire(False)
    assert s.acquire(timeout=0.05) is False
    s.release()
    s.release()
    s.release()   # unbounded
    assert s.get_value() == 3
    b = pp.BoundedSemaphore(2)
    b.acquire()
    b.release()
    with pytest.raises(ValueError):
        b.release()
    assert pp.Semaphore(0).get_value() == 0


def test_semaphore_wakes_thread():
    s = pp.Semaphore(0)
    got = []
    t = threading.Thread(target=lambda: got.append(s.acquire(timeout=5)))
    t.start()
    time.sleep(0.05)
    s.release()
    t.join()
    assert got == [True]


def test_condition_event_barrier_threads():
    c = pp.Condition()
    state = pp.Value("i", 0)
    done = []

    def waiter():
        with c:
            done.append(c.wait_for(lambda: state.value == 1, timeout=5))

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    with c:
        state.value = 1
        c.notify_all()
    t.join()
    assert done == [True]
    with pytest.raises(AssertionError):
        c.wait(0)            # not acquired, like multiprocessing
    e = pp.Event()
    assert not e.is_set() and e.wait(0.01) is False
    e.set()
    assert e.is_set() and e.wait(1)
    e.clear()
    assert not e.is_set()
    b = pp.Barrier(2, timeout=5)
    res = []
    t = threading.Thread(target=lambda: res.append(b.wait()))
    t.start()
    res.append(b.wait())
    t.join()
    assert sorted(res) == [0, 1]
    assert b.parties == 2 and b.n_waiting == 0 and not b.broken


def test_barrier_broken_and_timeout():
    b = pp.Barrier(2)
    with pytest.raises(threading.BrokenBarrierError):
        b.wait(timeout=0.05)
    assert b.broken
    b.reset()
    assert not b.broken


def test_lock_wait_interruptible():
    """A blocked acquire wakes to run signal handlers (Ctrl-C works)."""
    import signal

    lk = pp.Lock()
    lk.acquire()

    class Boom(Exception):
        pass

    def handler(signum, frame):
        raise Boom

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(Boom):
            lk.acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------
# Pickling by handle in one process, and leaks

def test_pickle_roundtrip_same_memory():
    objs = [pp.Value("i", 1), pp.Array("i", 3), pp.RawValue("d", 1.0), pp.RawArray("q", 2),
            pp.Array("c", b"ab")]
    for o in objs:
        o2 = pickle.loads(pickle.dumps(o, protocol=5))
        np.asarray(o2).reshape(-1)[0] = 1 if np.asarray(o2).dtype.kind != "S" else b"z"
        assert bytes(memoryview(o)) == bytes(memoryview(o2))
    lk = pp.Lock()
    lk2 = pickle.loads(pickle.dumps(lk))
    lk.acquire()
    assert not lk2.acquire(False)
    lk2.release()
    v = pp.Value("i")
    v2 = pickle.loads(pickle.dumps(v))
    assert type(v2.get_lock()) is pp.RLock
    v2.value = 42
    assert v.value == 42


def test_pickle_of_dead_segment_fails_cleanly():
    a = pp.RawArray("i", 100000)   # own segment
    data = pickle.dumps(a)
    del a
    gc.collect()
    with pytest.raises(FileNotFoundError):
        pickle.loads(data)




@pytest.mark.parametrize("make", [pp.Array, pp.RawArray])
def test_array_larger_than_the_machine_raises_oserror_before_allocating(make):
    # 80 TB: multiprocessing raises OSError (its arena file cannot be that big); a memfd can
    # be, sparse, and would fail only when touched
    fds, maps = _memfds(), _own_segment_maps()
    with pytest.raises(OSError) as info:
        make("q", 10**13)
    assert info.value.errno == errno.ENOMEM
    assert _memfds() == fds and _own_segment_maps() == maps   # nothing was allocated
    assert len(make("q", 10)) == 10


def _own_segment_maps():
    """Mappings of pyparallel memfd segments in this process."""
    with open("/proc/self/maps") as f:
        return sum("/memfd:pyparallel (deleted)" in line for line in f)


def _own_shm_names():
    """Names in /dev/shm that pyparallel could have made (it names none: segments are
    memfds). Other programs' files there are not counted."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {n for n in os.listdir("/dev/shm") if "pyparallel" in n}


def test_no_leaked_segments_or_fds():
    gc.collect()
    fds, maps, shm_before = _memfds(), _own_segment_maps(), _own_shm_names()
    # another program making a file in /dev/shm meanwhile (joblib's loky does) is no leak
    foreign = (tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="sem.loky-")
               if os.path.isdir("/dev/shm") else contextlib.nullcontext())
    with foreign:
        for _ in range(3):
            objs = [pp.Array("d", 100000) for _ in range(5)]
            objs += [pp.Value("i") for _ in range(2000)]
            objs += [pp.Lock(), pp.Condition(), pp.Event(), pp.Barrier(2)]
            objs += [pickle.loads(pickle.dumps(o)) for o in objs[:5]]
            assert _memfds() > fds and _own_segment_maps() > maps   # the counts see them
            del objs
            gc.collect()
            # one small-object arena may stay for the next Value
            assert _memfds() <= fds + 1
            assert _own_segment_maps() <= maps + 1
        assert _own_shm_names() <= shm_before


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(code=st.sampled_from(list("bBhHiIlLqQ")), start=st.integers(), deltas=st.lists(
    st.integers(min_value=-(2**63), max_value=2**64 - 1), max_size=8))
def test_atomic_add_matches_checked_arithmetic(code, start, deltas):
    import array

    bits = array.array(code).itemsize * 8
    signed = code.islower()
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    start = lo + start % (hi - lo + 1)

    v = pp.Value(code, start)
    expect = start
    for d in deltas:
        if lo <= d <= hi and lo <= expect + d <= hi:
            expect += d
            assert v.add(d) == expect
        else:   # a delta or a sum out of the type's range: refused, the item unchanged
            with pytest.raises(OverflowError):
                v.add(d)
    assert v.value == v.load() == expect


def test_cloudpickle_by_handle_including_closures():
    """pyparallel.Pool pickles with cloudpickle: objects and closures over them keep the handle."""
    cloudpickle = pytest.importorskip("cloudpickle")
    objs = [pp.Value("i", 1), pp.Array("d", 3), pp.RawValue("q"), pp.RawArray("i", 2), pp.Lock(),
            pp.RLock(), pp.Semaphore(2), pp.BoundedSemaphore(), pp.Event(), pp.Condition(),
            pp.Barrier(2), pp.Array("c", b"ab")]
    for o in objs:
        data = cloudpickle.dumps(o, protocol=5)
        assert len(data) < 1000             # a handle, not the data
        assert type(pickle.loads(data)).__name__ == type(o).__name__
    v = objs[0]
    f = pickle.loads(cloudpickle.dumps(lambda: v.add(1)))
    f()
    assert v.value == 2


def test_segment_write_words_and_release():
    """The Segment primitives the pool's spill segments use."""
    from pyparallel import _core

    seg = _core.Segment(1 << 20)
    data = bytes(range(256)) * 1024  # 256 KiB: copied with the GIL released
    seg.write(64, data)
    assert bytes(memoryview(seg)[64:64 + len(data)]) == data
    with pytest.raises(IndexError):
        seg.write((1 << 20) - 10, b"x" * 11)
    with pytest.raises(IndexError):
        seg.write(-1, b"x")
    assert seg.load32(0) == 0
    seg.store32(0, 0xFFFFFFFF)
    assert seg.load32(0) == 0xFFFFFFFF
    with pytest.raises(ValueError):
        seg.load32(2)  # unaligned
    with pytest.raises(OverflowError):
        seg.store32(0, 1 << 32)
    view = memoryview(seg)[100:200]
    assert seg.release(0) is False and seg.load32(0) == 0xFFFFFFFF  # a view exists
    view.release()
    assert seg.release(0) is True and seg.load32(0) == 0
    seg.close()
    with pytest.raises(ValueError):
        seg.write(0, b"x")


def test_bounded_semaphore_zero_like_multiprocessing():
    import multiprocessing as mp
    for make in (pp.BoundedSemaphore, mp.BoundedSemaphore):
        s = make(0)
        assert s.get_value() == 0
        assert s.acquire(False) is False
        assert s.acquire(timeout=0.01) is False
        with pytest.raises(ValueError):
            s.release()
    with pytest.raises(OSError):
        pp.BoundedSemaphore(-1)
