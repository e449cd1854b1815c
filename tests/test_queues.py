"""pyparallel Queue, JoinableQueue, SimpleQueue: multiprocessing's semantics (checked side by
side with multiprocessing where it matters), many producers and consumers in other processes
under every start method, big messages, SIGKILL of a producer or consumer mid-operation,
Ctrl-C in a blocking get, leak gates and bad input. Several cases are CPython's own
(Lib/test/_test_multiprocessing.py, _TestQueue), restated."""
import gc
import multiprocessing as mp
import os
import pickle
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy as np
import pytest

import pyparallel as pp
from pyparallel import _core
from _util import memfd_count

METHODS = [m for m in ("fork", "forkserver", "spawn") if m in mp.get_all_start_methods()]


@pytest.fixture(params=METHODS)
def ctx(request):
    return mp.get_context(request.param)


# ---- children (module level so that spawn can import them) ----

def _produce(q, start, n, done=None):
    for i in range(start, start + n):
        q.put((start, i))
        if done is not None:
            done.add(1)


def _consume(q, n, out):
    got = [q.get(timeout=30) for _ in range(n)]
    out.put(got)


def _consume_counted(q, done, n):
    for _ in range(n):
        q.get()
        done.add(1)


def _echo(inq, outq):
    while True:
        item = inq.get()
        if item is None:
            return
        outq.put(item)


def _joinable_worker(q, results):
    while True:
        item = q.get()
        if item is None:
            q.task_done()
            return
        results.put(item * 2)
        q.task_done()


def _put_and_exit(q, n):
    for i in range(n):
        q.put(i)
    os._exit(0)   # no atexit, no flush: multiprocessing.Queue's feeder would lose these


def _hold_big(q, n, done):
    held = [q.get(timeout=30) for _ in range(n)]   # noqa: F841 (held until killed)
    done.add(1)
    time.sleep(600)


def _drop_all(holder):
    holder.clear()
    gc.collect()


def _pool_task(args):
    q, i = args
    q.put(i * i)
    return i


# ---- API and semantics ----

def test_fifo_and_types():
    q = pp.Queue()
    items = [1, "two", 3.0, None, (4, [5]), {"six": 6}, b"seven", bytearray(b"8"), 2 ** 100]
    for x in items:
        q.put(x)
    assert q.qsize() == len(items)
    assert [q.get() for _ in items] == items
    assert q.empty()


def test_put_get_nowait_full_empty_like_multiprocessing():
    for q in (pp.Queue(maxsize=2), mp.Queue(maxsize=2)):
        assert q.empty() and not q.full()
        q.put(1)
        q.put_nowait(2)
        assert q.full()
        with pytest.raises(queue.Full):
            q.put_nowait(3)
        with pytest.raises(queue.Full):
            q.put(3, block=False)
        with pytest.raises(queue.Full):
            q.put(3, timeout=0.05)
        with pytest.raises(queue.Full):
            q.put(3, True, -1)          # a negative timeout is zero, as multiprocessing's
        assert q.get() == 1
        assert q.get_nowait() == 2
        with pytest.raises(queue.Empty):
            q.get_nowait()
        with pytest.raises(queue.Empty):
            q.get(False)
        with pytest.raises(queue.Empty):
            q.get(timeout=0.05)
        q.close()


def test_get_timeout_is_honoured():
    q = pp.Queue()
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.3)
    assert time.monotonic() - t0 >= 0.25   # does not give up early (no upper bound tested)


@pytest.mark.parametrize("make", [pp.Queue, pp.JoinableQueue])
@pytest.mark.parametrize("timeout", ["x", "1", b"1"])
def test_timeout_that_is_not_a_number_raises_typeerror(make, timeout):
    # as multiprocessing.Queue (its SemLock, or monotonic() + timeout), blocking or not
    q = make()
    for call in (lambda: q.get(timeout=timeout), lambda: q.get(False, timeout),
                 lambda: q.put(1, timeout=timeout), lambda: q.put(1, False, timeout)):
        with pytest.raises(TypeError):
            call()
    assert q.empty()                           # the refused put put nothing
    q.put(1, timeout=np.float32(1))            # a real number of any kind is a timeout
    assert q.get(timeout=60) == 1
    q.close()


def test_blocking_get_wakes_on_put_from_thread():
    q = pp.Queue()
    threading.Timer(0.1, q.put, ("late",)).start()
    assert q.get(timeout=20) == "late"


def test_blocking_put_wakes_on_get():
    q = pp.Queue(maxsize=1)
    q.put(0)
    threading.Timer(0.1, q.get).start()
    q.put(1, timeout=20)
    assert q.get() == 1


def test_maxsize_rules_like_multiprocessing():
    for maxsize in (0, -1, -100):
        q, ref = pp.Queue(maxsize), mp.Queue(maxsize)
        assert q._maxsize == ref._maxsize   # unbounded, as multiprocessing says it
        for i in range(1000):
            q.put_nowait(i)
        assert q.qsize() == 1000 and not q.full()
        ref.close()
    for bad in ("3", 2.5, None):
        with pytest.raises(TypeError):
            pp.Queue(bad)


def test_closed_queue_raises_value_error():
    q = pp.Queue()
    q.put(1)
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.put(2)
    with pytest.raises(ValueError, match="is closed"):
        q.get()
    q.join_thread()
    q2 = pp.Queue()
    with pytest.raises(AssertionError):
        q2.join_thread()   # as multiprocessing: only after close()
    q2.cancel_join_thread()


def _pickling_error(obj):
    """The exception type multiprocessing's pickler raises for obj on this Python (the
    type changed across versions: 3.14 raises PicklingError where 3.11 raised
    AttributeError)."""
    from multiprocessing.reduction import ForkingPickler
    try:
        ForkingPickler.dumps(obj)
    except Exception as e:  # noqa: BLE001 - the type is the answer
        return type(e)
    raise AssertionError(f"{obj!r} pickles")


def test_unpicklable_item_goes_to_the_feeder_error_hook_and_later_puts_go_on(capsys):
    # multiprocessing (bpo-30414, bpo-33078): put returns, the item is dropped and
    # Queue._on_queue_feeder_error(e, obj) prints its traceback; the queue goes on
    q = pp.Queue()
    q.put("before")
    q.put(threading.Lock())
    err = capsys.readouterr().err
    assert f"{_pickling_error(threading.Lock()).__name__}: cannot pickle '_thread.lock' object" in err
    assert q.qsize() == 1
    q.put("after")
    assert [q.get(), q.get()] == ["before", "after"]
    bounded = pp.Queue(maxsize=1)
    bounded.put(threading.Lock())      # takes no room
    bounded.put(True, timeout=60)
    assert bounded.qsize() == 1 and bounded.get() is True and bounded.empty()
    with pytest.raises(queue.Full):    # a full queue refuses before anything is pickled
        bounded.put(1)
        bounded.put(threading.Lock(), block=False)
    jq = pp.JoinableQueue()
    jq.put(threading.Lock())           # counts no unfinished task (multiprocessing's join hangs)
    jq.join()
    capsys.readouterr()


class _HookQueue(pp.Queue):
    seen = []

    @staticmethod
    def _on_queue_feeder_error(e, obj):
        _HookQueue.seen.append((type(e), obj))


def test_feeder_error_hook_can_be_overridden():
    q = _HookQueue()
    lock = threading.Lock()
    q.put(lock)
    q.put(True)
    assert q.get(timeout=60) is True
    assert _HookQueue.seen == [(TypeError, lock)]


class _Bytes(bytes):
    pass


class _Nested:
    """Puts a marker on a queue while it is being pickled (a nested put)."""

    def __init__(self, q):
        self.q = q

    def __reduce__(self):
        self.q.put("nested")
        return (str, ("outer",))


class _Obj:
    pass


class _Raising(pp.Queue):
    @staticmethod
    def _on_queue_feeder_error(e, obj):
        raise e


def test_bytes_and_bytes_subclasses_round_trip_exactly():
    q = pp.Queue()
    for x in (b"", b"x" * 64, _Bytes(b"sub"), b"y" * 100_000, _Bytes(b"z" * 100_000)):
        q.put(x)
        got = q.get()
        assert got == x and type(got) is type(x)


def test_picklers_are_reused_safely():
    q, other = pp.Queue(), pp.Queue()
    q.put(_Nested(other))                     # a put inside a put's pickling
    assert q.get() == "outer" and other.get() == "nested"
    half = [1, threading.Lock()]
    with pytest.raises(_pickling_error(half)):
        pp.SimpleQueue().put(half)            # fails half way through a pickle
    with pytest.raises(_pickling_error(half)):
        _Raising().put(half)
    obj = _Obj()
    ref = weakref.ref(obj)
    q.put([obj, obj, (obj,)])                 # the pickler's memo must not keep obj alive
    got = q.get()
    assert got[0] is got[1] is got[2][0] and type(got[0]) is _Obj
    del obj, got
    gc.collect()
    assert ref() is None
    q.put({"a": [1, 2]})
    assert q.get() == {"a": [1, 2]} and q.qsize() == 0
    ba = bytearray(300_000)                   # big in-band payloads: copied at put
    q.put([ba, bytes(200_000), "tail"])
    ba[:] = b"\x01" * len(ba)
    got = q.get()
    assert got == [bytearray(300_000), bytes(200_000), "tail"] and type(got[0]) is bytearray


def test_joinable_queue_join_and_task_done():
    q = pp.JoinableQueue()
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()
    for i in range(5):
        q.put(i)
    for i in range(5):
        q.get()
        q.task_done()
    q.join()
    with pytest.raises(ValueError):
        q.task_done()


def test_joinable_queue_with_workers(ctx):
    # CPython's test_task_done, across processes.
    q, results = pp.JoinableQueue(), pp.Queue()
    workers = [ctx.Process(target=_joinable_worker, args=(q, results)) for _ in range(2)]
    for w in workers:
        w.start()
    for i in range(40):
        q.put(i)
    q.join()
    assert q._ring.unfinished() == 0
    assert sorted(results.get(timeout=10) for _ in range(40)) == [i * 2 for i in range(40)]
    for _ in workers:
        q.put(None)
    for w in workers:
        w.join(30)
        assert w.exitcode == 0


def test_simple_queue_like_multiprocessing():
    for q in (pp.SimpleQueue(), mp.SimpleQueue()):
        assert q.empty()
        q.put([1, 2])
        assert not q.empty()
        assert q.get() == [1, 2]
        q.close()
        with pytest.raises(OSError):
            q.put(1)
        with pytest.raises(OSError):
            q.get()


def test_put_before_fork_is_seen_by_child():
    # CPython's test_fork: items put before a fork are there for the child; with no feeder
    # thread they are in shared memory already.
    q, out = pp.Queue(), pp.Queue()
    for i in range(10):
        q.put(i)
    p = mp.get_context("fork").Process(target=_consume, args=(q, 10, out))
    p.start()
    assert out.get(timeout=30) == list(range(10))
    p.join(30)


def test_items_survive_producer_exit_without_flush(ctx):
    q = pp.Queue()
    p = ctx.Process(target=_put_and_exit, args=(q, 500))
    p.start()
    p.join(60)
    assert q.qsize() == 500
    assert [q.get(timeout=5) for _ in range(500)] == list(range(500))


# ---- many producers and consumers in other processes ----

def test_many_producers_many_consumers(ctx):
    q, out = pp.Queue(maxsize=64), pp.Queue()
    nprod, ncons, per = 3, 3, 300
    total = nprod * per
    shares = [total // ncons] * ncons
    procs = [ctx.Process(target=_produce, args=(q, k * 10_000, per)) for k in range(nprod)]
    procs += [ctx.Process(target=_consume, args=(q, shares[k], out)) for k in range(ncons)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in range(ncons)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    flat = [x for g in got for x in g]
    expected = [(k * 10_000, k * 10_000 + i) for k in range(nprod) for i in range(per)]
    assert sorted(flat) == sorted(expected)          # the exact multiset
    for g in got:                                    # FIFO per producer, in each consumer
        for k in range(nprod):
            mine = [i for s, i in g if s == k * 10_000]
            assert mine == sorted(mine)
    assert q.qsize() == 0


def test_queue_as_pool_task_argument(pool_context):
    q = pp.Queue()
    with pp.Pool(2, context=pool_context) as pool:
        assert pool.map(_pool_task, [(q, i) for i in range(20)]) == list(range(20))
    assert sorted(q.get(timeout=10) for _ in range(20)) == [i * i for i in range(20)]


def test_queue_through_multiprocessing_pool():
    q = pp.Queue()
    with mp.get_context("spawn").Pool(2) as pool:
        assert pool.map(_pool_task, [(q, i) for i in range(8)]) == list(range(8))
    assert sorted(q.get(timeout=10) for _ in range(8)) == [i * i for i in range(8)]


def test_queue_through_a_queue():
    q, inner = pp.Queue(), pp.Queue()
    q.put(inner)
    got = q.get()
    got.put("x")
    assert inner.get(timeout=5) == "x"
    assert got._ring is inner._ring   # one mapping per ring per process


# ---- big messages ----

def test_big_messages_in_process():
    q = pp.Queue()
    a = np.arange(1 << 18, dtype=np.float64)       # 2 MiB
    b = os.urandom(3 << 20)                        # 3 MiB bytes, in-band pickle
    q.put(a)
    q.put(b)
    q.put({"nested": [a[::2].copy(), a.reshape(512, 512).T]})   # F-order and strided
    x = q.get()
    assert np.array_equal(x, a) and x.flags.writeable
    assert q.get() == b
    d = q.get()["nested"]
    assert np.array_equal(d[0], a[::2]) and np.array_equal(d[1], a.reshape(512, 512).T)
    stats = q._ring.stats()
    assert stats["heap_used"] > 0 and q.qsize() == 0


def test_big_message_larger_than_window_and_many_pending():
    # The ring window (4 GiB virtual) is far bigger than any test; a small window shows that
    # a message larger than the whole ring still goes through (it goes out of band).
    ring = _core.Ring(window=1 << 20)
    big = os.urandom(3 << 20)
    assert ring.put(0, [big], False, 0.0, 0)
    tag, parts = ring.get(False, 0.0)
    assert bytes(parts[0]) == big


def test_small_window_fills_and_wraps():
    # Space comes back in 256 KiB blocks once consumed; order holds across wrap-arounds.
    ring = _core.Ring(window=1 << 20)
    pad = b"m" * 1000
    nxt = expect = 0
    while ring.put(0, [b"%08d" % nxt, pad], False, 0.0, 0):
        nxt += 1
    assert 900 < nxt < 1100                     # about 1 MiB of ~1 KiB records
    for _ in range(12):                         # drain half, refill: wraps several times
        for _ in range(ring.qsize() // 2):
            tag, parts = ring.get(False, 0.0)
            assert parts[0] == b"%08d" % expect and parts[1] == pad
            expect += 1
        while ring.put(0, [b"%08d" % nxt, pad], False, 0.0, 0):
            nxt += 1
    assert ring.qsize() == nxt - expect
    st = ring.stats()
    assert st["tail"] > 4 * (1 << 20) and st["freed"] > 3 * (1 << 20)


def test_big_messages_across_processes(ctx):
    inq, outq = pp.Queue(), pp.Queue()
    p = ctx.Process(target=_echo, args=(inq, outq))
    p.start()
    arrays = [np.random.default_rng(i).random(1 << 17) for i in range(6)]   # 1 MiB each
    for a in arrays:
        inq.put(a)
    inq.put(None)
    for a in arrays:
        assert np.array_equal(outq.get(timeout=60), a)
    p.join(60)
    assert p.exitcode == 0


def test_big_message_regions_are_recycled():
    # One message at a time: each reuses the region the previous one gave back, so nothing
    # new is allocated (no page faults: that is what makes 1 MiB messages fast).
    q = pp.Queue()
    for i in range(50):
        q.put(np.full(1 << 17, float(i)))           # 1 MiB
        a = q.get()
        assert a.shape == (1 << 17,) and a[0] == a[-1] == i
        del a
    st = q._ring.stats()
    assert st["fresh_used"] == 0 and st["slot_uses"] == 50
    assert st["slot_bytes"] <= 2 << 20
    b = os.urandom(300_000)                          # bytes: sent raw, also recycled
    for _ in range(5):
        q.put(b)
        assert q.get() == b
    assert q._ring.stats()["fresh_used"] == 0


def test_received_big_message_memory_is_returned():
    # More pending than there are recycled regions: the rest get regions of their own. Once
    # every view is gone, the fresh regions are punched out and the free recycled regions keep
    # at most RING_CACHE_MAX.
    q = pp.Queue()
    n = _core.RING_SLOTS + 8
    for _ in range(n):
        q.put(np.ones(1 << 18))                      # 2 MiB
    arrs = [q.get() for _ in range(n)]
    assert all(a.sum() == 1 << 18 for a in arrs)
    held = _allocated_kib(q)
    assert held >= n * 2048
    assert q._ring.stats()["fresh_used"] > 0
    del arrs
    gc.collect()
    assert _allocated_kib(q) <= _core.RING_CACHE_MAX // 1024 + 1024
    assert q._ring.stats()["slots_free"] == _core.RING_SLOTS


def test_region_held_by_dead_process_is_taken_back():
    q = pp.Queue()
    dead = _dead_pid()
    for i in range(_core.RING_SLOTS):
        q._ring._slot_for_test(i, dead)
    q.put(np.ones(1 << 17))
    st = q._ring.stats()      # the put's sweep took every one of them back
    assert st["reclaims"] == _core.RING_SLOTS and st["fresh_used"] == 0
    assert st["slots_free"] == _core.RING_SLOTS - 1
    assert q.get().sum() == 1 << 17


def test_region_held_by_live_process_is_left_alone():
    q = pp.Queue()
    for i in range(_core.RING_SLOTS):
        q._ring._slot_for_test(i, os.getppid())     # alive, and not this process
    q.put(np.ones(1 << 17))
    st = q._ring.stats()
    assert st["reclaims"] == 0 and st["fresh_used"] > 0
    assert q.get().sum() == 1 << 17


def test_sigkill_consumer_holding_big_messages():
    # A consumer killed while it holds received big messages (numpy views of their regions):
    # the regions are taken back by the next puts, none is lost for good.
    ctx = mp.get_context("fork")
    q, done = pp.Queue(), pp.Value("q", 0)
    n = _core.RING_SLOTS
    for i in range(n):
        q.put(np.full(1 << 17, float(i)))
    p = ctx.Process(target=_hold_big, args=(q, n, done))
    p.start()
    deadline = time.monotonic() + 30
    while done.value == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done.value == 1 and q.qsize() == 0
    assert q._ring.stats()["slots_free"] == 0
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    for i in range(n):
        q.put(np.full(1 << 17, float(i)))
    st = q._ring.stats()
    assert st["reclaims"] == n and st["fresh_used"] == 0
    assert [q.get()[0] for _ in range(n)] == [float(i) for i in range(n)]


def test_forked_child_does_not_give_back_an_inherited_region():
    q = pp.Queue()
    q.put(np.arange(1 << 17, dtype=np.float64))
    holder = [q.get()]            # the only reference: the child's copy of it drops it
    p = mp.get_context("fork").Process(target=_drop_all, args=(holder,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    q.put(np.zeros(1 << 17))                         # must not land in holder[0]'s region
    z = q.get()
    assert np.array_equal(holder[0], np.arange(1 << 17, dtype=np.float64)) and not z.any()
    assert q._ring.stats()["slots_free"] == _core.RING_SLOTS - 2


def _allocated_kib(q):
    st = os.fstat(q._ring.fd)
    return st.st_blocks // 2


# ---- fault tolerance: SIGKILL mid-operation ----

def _dead_pid():
    p = mp.get_context("fork").Process(target=os._exit, args=(0,))
    p.start()
    p.join()
    return p.pid


@pytest.mark.parametrize("which", [0, 1])
def test_lock_left_by_dead_process_is_taken_over(which):
    q = pp.Queue()
    q.put("a")
    q._ring._lock_for_test(which, _dead_pid())
    q.put("b", timeout=20)
    assert q.get(timeout=20) == "a"
    assert q.get(timeout=20) == "b"
    assert q._ring.stats()["recoveries"] == 1


def _put_loop(q, done, payload):
    i = 0
    while True:
        q.put((i, payload))
        done.add(1)
        i += 1


@pytest.mark.parametrize("size", [16, 200_000])
def test_sigkill_producer_mid_put(size):
    ctx = mp.get_context("fork")
    for trial in range(6):
        q, done = pp.Queue(maxsize=50), pp.Value("q", 0)
        p = ctx.Process(target=_put_loop, args=(q, done, b"p" * size))
        p.start()
        items = []
        while done.value < 20:
            items.append(q.get(timeout=30)[0])   # keep it putting (the queue is bounded)
            time.sleep(0.0005 * trial)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        n_done = done.value
        pending = q.qsize()
        items += [q.get(timeout=10)[0] for _ in range(pending)]
        assert q.qsize() == 0
        with pytest.raises(queue.Empty):
            q.get(timeout=0.05)
        # every put that returned arrived exactly once, in order, plus at most the one in
        # flight when it was killed
        assert items == list(range(len(items)))
        assert len(items) in (n_done, n_done + 1)
        q.put("still works", timeout=20)
        assert q.get(timeout=20) == "still works"


@pytest.mark.parametrize("size", [16, 200_000])
def test_sigkill_consumer_mid_get(size):
    ctx = mp.get_context("fork")
    n = 400
    for trial in range(6):
        q, done = pp.Queue(), pp.Value("q", 0)
        for i in range(n):
            q.put((i, b"c" * size))
        p = ctx.Process(target=_consume_counted, args=(q, done, n))
        p.start()
        deadline = time.monotonic() + 30
        while done.value < 10 + 20 * trial and time.monotonic() < deadline:
            time.sleep(0.0002)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        n_done = done.value
        left = q.qsize()
        taken = n - left
        assert taken in (n_done, n_done + 1)      # at most the one in flight is lost
        items = [q.get(timeout=10)[0] for _ in range(left)]
        assert items == list(range(taken, n))     # the rest, in order, exactly once
        q.put("still works", timeout=20)
        assert q.get(timeout=20) == "still works"


# ---- shared memory of killed producers, bounded unread bytes (issue 26) ----

def _die_mid_put(q, sizes, ready):
    # What a producer SIGKILLed mid-put leaves: each region written, no put committed.
    for n in sizes:
        q._ring._write_for_test(b"k" * n)
    ready.put(os.getpid())
    time.sleep(600)


def test_regions_of_producer_killed_mid_put_are_taken_back(pool_context):
    # A recycled region (8 MiB) and a fresh one (20 MiB) written by a producer killed before
    # its commit: the next put takes both back (before: held, and the fresh one allocated,
    # until the queue itself was freed; the ring grew by ~36 MiB a kill).
    ctx = mp.get_context(pool_context)
    q, ready = pp.Queue(), pp.Queue()
    sizes = [_core.RING_SLOT_MAX - 4096, 20 << 20, 4 << 20]
    for _ in range(3):
        p = ctx.Process(target=_die_mid_put, args=(q, sizes, ready))
        p.start()
        assert ready.get(timeout=120) == p.pid
        st = q._ring.stats()
        assert st["fresh_held"] == 1 and st["slots_free"] == _core.RING_SLOTS - 2
        os.kill(p.pid, signal.SIGKILL)
        p.join(60)
        time.sleep(0.05)    # dead holders are looked for at most every 2 ms
        q.put(b"x" * (1 << 20))
        assert q.get(timeout=60) == b"x" * (1 << 20)
    st = q._ring.stats()
    assert st["fresh_held"] == 0 and st["slots_free"] == _core.RING_SLOTS
    assert st["reclaims"] >= 6
    # what is left is the free regions' cache
    assert _allocated_kib(q) <= _core.RING_CACHE_MAX // 1024 + 1024


def test_region_of_live_producer_mid_put_is_left_alone():
    q = pp.Queue()
    i = q._ring._write_for_test(b"k" * (20 << 20))   # this process is "mid-put"
    assert i >= _core.RING_SLOTS
    time.sleep(0.05)
    q.put(b"x" * (1 << 20))
    assert q.get() == b"x" * (1 << 20)
    assert q._ring.stats()["fresh_held"] == 1
    assert _allocated_kib(q) >= 20 << 10


def test_queue_maxbytes_bounds_unread_bytes():
    q = pp.Queue(maxbytes=1 << 20)
    item = b"b" * (600 << 10)
    q.put(item)
    with pytest.raises(queue.Full):
        q.put_nowait(item)
    with pytest.raises(queue.Full):
        q.put(item, timeout=0.1)
    assert q.qsize() == 1 and q._ring.stats()["pending"] == len(item)
    assert q.get() == item
    q.put(b"c" * (3 << 20), timeout=60)      # bigger than the bound: goes into an empty queue
    with pytest.raises(queue.Full):
        q.put_nowait(b"d")
    assert q.get() == b"c" * (3 << 20)
    for _ in range(100):                     # small ones up to the bound
        q.put_nowait(b"e" * 1000)
    assert q.qsize() == 100 and q._ring.stats()["pending"] == 100_000
    assert [q.get() for _ in range(100)] == [b"e" * 1000] * 100
    assert q._ring.stats()["pending"] == 0
    with pytest.raises(ValueError):
        pp.Queue(maxbytes=0)


def _put_then_report(q, item, out):
    q.put(item)
    out.put("second put returned")


def test_queue_maxbytes_blocks_producer_until_read(pool_context):
    # The bound travels with the queue: a producer in another process waits for the reader.
    ctx = mp.get_context(pool_context)
    q, out = pp.Queue(maxbytes=1 << 20), pp.Queue()
    item = b"m" * (700 << 10)
    q.put(item)
    p = ctx.Process(target=_put_then_report, args=(q, item, out))
    p.start()
    with pytest.raises(queue.Empty):
        out.get(timeout=1.0)                 # the child waits: 1.4 MiB would be unread
    assert q.qsize() == 1
    assert q.get(timeout=60) == item
    assert out.get(timeout=120) == "second put returned"
    assert q.get(timeout=60) == item
    p.join(60)
    assert p.exitcode == 0


def test_unbounded_queue_put_never_waits_on_bytes():
    # multiprocessing's put never waits on bytes: putting everything before reading (in one
    # process) must keep working.
    q = pp.Queue()
    for _ in range(40):
        q.put_nowait(b"u" * (1 << 20))
    assert q.qsize() == 40
    assert all(q.get() == b"u" * (1 << 20) for _ in range(40))


# ---- Ctrl-C ----

def test_ctrl_c_interrupts_blocking_get():
    code = textwrap.dedent("""
        import os, signal, threading, sys
        import pyparallel as pp
        q = pp.Queue()
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            q.get()
        except KeyboardInterrupt:
            q.put("usable")
            print("interrupted", q.get(timeout=5))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "interrupted usable"


# ---- leaks ----

def test_no_leaked_fds_or_segments():
    gc.collect()
    fds0 = len(os.listdir("/proc/self/fd"))
    mem0 = memfd_count()
    for _ in range(50):
        q = pp.JoinableQueue()
        q.put(np.zeros(1 << 16))
        q2 = pickle.loads(pickle.dumps(q))
        q2.get()
        del q, q2
        s = pp.SimpleQueue()
        s.put(1)
        del s
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds0
    assert memfd_count() == mem0


def test_no_process_left_behind(ctx):
    before = set(mp.active_children())     # only this test's children count
    q = pp.Queue()
    p = ctx.Process(target=_produce, args=(q, 0, 10))
    p.start()
    [q.get(timeout=30) for _ in range(10)]
    p.join(30)
    assert p.exitcode == 0
    assert set(mp.active_children()) <= before
