"""pyparallel.shared across processes: every type through multiprocessing.Process (as
arguments under fork/forkserver/spawn, and inherited under fork), through Pool tasks as
explicitly pickled handles, robust (abandoned) lock recovery, and no leaked segments."""
import gc
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest

import pyparallel as pp
from _util import memfd_count as _memfds

METHODS = [m for m in ("fork", "forkserver", "spawn") if m in mp.get_all_start_methods()]


@pytest.fixture(params=METHODS)
def shm_context(request):
    return mp.get_context(request.param)


def _objects():
    return dict(
        value=pp.Value("i", 0), array=pp.Array("d", 8), rawvalue=pp.RawValue("q", 0),
        rawarray=pp.RawArray("i", 4), string=pp.Array("c", b"....."),
        lock=pp.Lock(), rlock=pp.RLock(), sem=pp.Semaphore(0), bsem=pp.BoundedSemaphore(1),
        event=pp.Event(), cond=pp.Condition(), barrier=pp.Barrier(2, timeout=20),
    )


def _use_all(o, tag):
    """Runs in another process: touches every object, so the parent can check each one."""
    with o["lock"]:
        # Under the lock, so that the other process's read-modify-write cannot interleave
        # with this atomic add (a lock-free add beside a locked `+=` is a lost update).
        o["value"].value += 1
        o["value"].add(10)
    with o["rlock"]:
        with o["rlock"]:
            o["array"][tag] = 1.5 + tag
            np.asarray(o["array"])[7] += 1  # zero-copy view in the child too
    o["rawvalue"].add(100)
    o["rawarray"][tag] = tag + 1
    o["string"][tag] = b"x"
    o["sem"].release()
    assert o["bsem"].acquire(timeout=20)
    o["bsem"].release()
    assert o["event"].wait(20)
    with o["cond"]:
        o["cond"].notify_all()
    o["barrier"].wait()
    return tag


def _child(o, tag):
    _use_all(o, tag)


def _check(o, n):
    assert o["value"].value == 11 * n
    assert [o["array"][t] for t in range(n)] == [1.5 + t for t in range(n)]
    assert o["array"][7] == n
    assert o["rawvalue"].value == 100 * n
    assert list(o["rawarray"][:n]) == list(range(1, n + 1))
    assert o["string"].value[:n] == b"x" * n
    assert o["sem"].get_value() == n
    assert o["bsem"].get_value() == 1


def test_process_arguments_every_type(shm_context):
    o = _objects()
    o["event"].set()
    p = shm_context.Process(target=_child, args=(o, 0))
    p.start()
    o["barrier"].wait()
    p.join(30)
    assert p.exitcode == 0
    _check(o, 1)


def test_process_inheritance_fork():
    if "fork" not in METHODS:
        pytest.skip("no fork")
    o = _objects()
    o["event"].set()
    p = mp.get_context("fork").Process(target=lambda: _use_all(o, 0))
    p.start()
    o["barrier"].wait()
    p.join(30)
    assert p.exitcode == 0
    _check(o, 1)


def _waiter(cond, flag, ev, out):
    with cond:
        ok = cond.wait_for(lambda: flag.value == 1, timeout=20)
    out.store(1 if ok else -1)
    out.add(10 if ev.wait(20) else 0)


def test_cross_process_wait_notify(shm_context):
    """Condition.wait_for and Event.wait really block in the child until the parent acts."""
    cond, flag, ev, out = pp.Condition(), pp.Value("i", 0), pp.Event(), pp.Value("i", 0)
    p = shm_context.Process(target=_waiter, args=(cond, flag, ev, out))
    p.start()
    deadline = time.monotonic() + 20
    while cond._sleeping_count.get_value() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)        # the child is asleep in wait()
    assert out.value == 0
    with cond:
        flag.value = 1
        cond.notify_all()
    while out.value == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert out.value == 1       # woke on notify; now blocked on the event
    ev.set()
    p.join(20)
    assert p.exitcode == 0 and out.value == 11


def _pool_task(payload):
    o, tag = pickle.loads(payload)
    return _use_all(o, tag)


def test_pool_tasks_by_handle(shm_context):
    """Handles go through pickle in the parent and unpickle in Pool workers (not children of
    the pickling call), as pyparallel.Pool sends task arguments."""
    o = _objects()
    o["barrier"] = pp.Barrier(3, timeout=20)   # two tasks + the parent
    o["event"].set()
    with shm_context.Pool(2) as pool:
        res = pool.map_async(_pool_task, [pickle.dumps((o, t), protocol=5) for t in range(2)],
                             chunksize=1)
        o["barrier"].wait()
        assert sorted(res.get(30)) == [0, 1]
    _check(o, 2)


def _counter(payload, n, mode):
    v, lk = pickle.loads(payload)
    for _ in range(n):
        if mode == "lock":
            with lk:
                v.value += 1
        else:
            v.add(1)


@pytest.mark.parametrize("mode", ["lock", "atomic"])
def test_cross_process_counter_exact(mode):
    ctx = mp.get_context("fork")
    v, lk = pp.Value("q", 0, lock=False), pp.Lock()
    payload = pickle.dumps((v, lk))
    ps = [ctx.Process(target=_counter, args=(payload, 5000, mode)) for _ in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(30)
    assert v.value == 10000


def test_pool_array_is_shared_not_copied(shm_context):
    a = pp.Array("d", 1 << 16, lock=False)
    with shm_context.Pool(2) as pool:
        pool.map(_fill, [(pickle.dumps(a), i) for i in range(4)])
    n = np.asarray(a)
    for i in range(4):
        assert (n[i::4] == i + 1).all()


def _fill(args):
    payload, i = args
    n = np.asarray(pickle.loads(payload))
    n[i::4] = i + 1


# ------------------------------------------------------------------------------------------
# Robustness: a process dies holding a lock

def _die_holding(lk):
    lk.acquire()
    os._exit(0)


@pytest.mark.parametrize("kind", ["Lock", "RLock", "Value"])
def test_abandoned_lock_recovered(kind, shm_context):
    obj = getattr(pp, kind)() if kind != "Value" else pp.Value("i", 5)
    lk = obj if kind != "Value" else obj.get_lock()
    p = shm_context.Process(target=_die_holding, args=(lk,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert lk._owner_pid == p.pid
    assert lk.acquire(timeout=120) is True     # the timeout is a hang guard only
    assert lk.abandoned is True
    lk.release()
    assert lk.acquire(False) and lk.abandoned is False
    lk.release()
    if kind == "Value":
        obj.value += 1
        assert obj.value == 6


def test_abandoned_by_zombie_recovered():
    """The owner exited but has not been reaped yet (a zombie): still recovered."""
    lk = pp.Lock()
    pid = os.fork()
    if pid == 0:
        lk.acquire()
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while lk._owner_pid != pid and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert lk.acquire(timeout=10) and lk.abandoned
    finally:
        os.waitpid(pid, 0)


def test_blocked_child_can_be_interrupted():
    """A process blocked in acquire() gets SIGINT: KeyboardInterrupt, not a hang."""
    lk = pp.Lock()
    lk.acquire()
    ctx = mp.get_context("fork")
    p = ctx.Process(target=lk.acquire)
    p.start()
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGINT)
    p.join(10)
    assert p.exitcode == 1      # KeyboardInterrupt traceback, exit status 1
    lk.release()


# ------------------------------------------------------------------------------------------
# Leaks across processes



def test_no_leaks_after_processes():
    gc.collect()
    before = _memfds()
    ctx = mp.get_context("spawn")
    o = _objects()
    o["event"].set()
    big = pp.Array("d", 1 << 16)
    p = ctx.Process(target=_child, args=(o, 0))
    p.start()
    o["barrier"].wait()
    p.join(30)
    assert p.exitcode == 0
    del o, big, p
    gc.collect()
    assert _memfds() <= before + 1


def test_bank_account_demo_rows():
    rows = pp.shared.bank_account_demo(processes=2, deposits=5000)
    assert [r[0] for r in rows] == ["no lock", "with Lock", "atomic add"]
    for name, seconds, total, expected in rows:
        assert expected == 10000 and seconds > 0
        assert total == expected if name != "no lock" else 0 < total <= expected


def _attach_and_count(payloads):
    before = _memfds()      # a forked worker has inherited the parent's segments already
    objs = [pickle.loads(p) for p in payloads]
    attached = _memfds() - before
    total = sum(float(np.asarray(o).sum()) for o in objs)
    del objs
    gc.collect()
    return attached, _memfds() - before, total


def test_pool_workers_release_segments(shm_context):
    """A worker maps what it unpickles and lets go of it when the objects are dropped."""
    arrays = [pp.RawArray("d", 1 << 15) for _ in range(6)]
    for a in arrays:
        np.asarray(a)[:] = 1.0
    payloads = [pickle.dumps(a) for a in arrays]
    with shm_context.Pool(1) as pool:
        attached, after, total = pool.apply(_attach_and_count, (payloads,))
    assert after == 0 and total == 6 * (1 << 15)
    assert attached == (0 if shm_context.get_start_method() == "fork" else 6)


def _add_one(v):
    return v.add(1)


def test_pool_map_direct_where_multiprocessing_refuses(shm_context):
    """Passed straight to Pool.map (pickled by multiprocessing itself): multiprocessing's own
    Value is refused, pyparallel's travels as a handle."""
    with shm_context.Pool(2) as pool:
        with pytest.raises(RuntimeError, match="inheritance"):
            pool.map(_add_one, [mp.Value("i", 0)])
        v = pp.Value("i", 0)
        assert sorted(pool.map(_add_one, [v] * 8)) == list(range(1, 9))
        assert v.value == 8


def _outlive(a, attached, go):
    n = np.asarray(a)
    attached.set()
    assert go.wait(20)
    assert (n == 7).all()       # still intact after the creator dropped every reference
    n[:] = 9


def test_segment_outlives_its_creator_reference(shm_context):
    """Freed when the last process using it lets go, not when the creator drops it."""
    a = pp.RawArray("i", 1 << 15)           # a segment of its own
    np.asarray(a)[:] = 7
    attached, go = pp.Event(), pp.Event()
    p = shm_context.Process(target=_outlive, args=(a, attached, go))
    p.start()
    assert attached.wait(20)
    del a
    gc.collect()
    go.set()
    p.join(20)
    assert p.exitcode == 0


def test_empty_arrays():
    a, r = pp.Array("i", 0), pp.RawArray("d", [])
    assert len(a) == 0 and a[:] == [] and np.asarray(a).shape == (0,) and r[:] == []
    assert pickle.loads(pickle.dumps(a))[:] == []


# ---- a process that dies inside Condition.wait() / Barrier.wait() (issue 8, point 3) ----

def _cond_waiter(cond):
    with cond:
        cond.wait()          # killed here


def _barrier_party(barrier, results, i):
    try:
        barrier.wait()
        results[i] = 1       # passed: wrong, a party is dead
    except threading.BrokenBarrierError:
        results[i] = 2


def _sleepers(cond):
    return cond._sleeping_count._get_value() - cond._woken_count._get_value()


def _until(pred, limit=20.0):
    end = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def _kill(p):
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL


def test_notify_skips_a_waiter_killed_in_wait():
    ctx = mp.get_context("fork")
    cond = pp.Condition()
    p = ctx.Process(target=_cond_waiter, args=(cond,))
    p.start()
    _until(lambda: _sleepers(cond) == 1)
    _kill(p)
    # multiprocessing's notify() waits forever for the dead waiter to wake, holding the lock;
    # here it returns (within about one 50 ms slice), and the lock and condition still work.
    with cond:
        cond.notify()
    with cond:
        cond.notify_all()
    live = ctx.Process(target=_cond_waiter, args=(cond,))
    live.start()
    try:
        _until(lambda: _sleepers(cond) == 1)
        with cond:
            cond.notify()
        live.join(20)
        assert live.exitcode == 0    # the live waiter was woken by that notify
    finally:
        if live.is_alive():
            live.kill()
            live.join()


def _survivors_get_broken_barrier(ctx, barrier, results):
    """Parties 1 and 2 of a barrier whose party 0 died: both get BrokenBarrierError."""
    survivors = [ctx.Process(target=_barrier_party, args=(barrier, results, i)) for i in (1, 2)]
    for s in survivors:
        s.start()
    try:
        for s in survivors:
            s.join(60)
            assert s.exitcode == 0
        assert list(results) == [0, 2, 2]   # both survivors got BrokenBarrierError
        assert barrier.broken
    finally:
        for s in survivors:
            if s.is_alive():
                s.kill()
                s.join()


def test_barrier_with_a_party_killed_in_wait_breaks():
    ctx = mp.get_context("fork")
    barrier = pp.Barrier(3, timeout=2)
    results = pp.RawArray("i", 3)
    victim = ctx.Process(target=_barrier_party, args=(barrier, results, 0))
    victim.start()
    _until(lambda: barrier.n_waiting == 1)
    _kill(victim)
    _survivors_get_broken_barrier(ctx, barrier, results)


def _barrier_party_dying_when_counted(barrier):
    # Dies right after wait() counted it, before it sleeps (still holding the barrier's lock):
    # the window a SIGKILL can hit at any time, made deterministic.
    from pyparallel import shared
    shared.Condition._register = lambda self: os.kill(os.getpid(), signal.SIGKILL)
    barrier.wait()


def test_barrier_never_counts_a_party_killed_once_counted(shm_context):
    barrier = pp.Barrier(3, timeout=60)
    results = pp.RawArray("i", 3)
    victim = shm_context.Process(target=_barrier_party_dying_when_counted, args=(barrier,))
    victim.start()
    victim.join(60)
    assert victim.exitcode == -signal.SIGKILL
    assert barrier.n_waiting == 1              # counted, then died
    _survivors_get_broken_barrier(shm_context, barrier, results)
    # the dead party is forgotten: reset() completes and a full round passes
    barrier.reset()
    assert not barrier.broken and barrier.n_waiting == 0
    indices = []
    threads = [threading.Thread(target=lambda: indices.append(barrier.wait()))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(indices) == [0, 1, 2]


def test_barrier_timeout_with_a_dead_party_raises():
    # Only one survivor arrives: its timeout breaks the barrier, and the notify_all of
    # _break() must not wait for the dead party.
    ctx = mp.get_context("fork")
    barrier = pp.Barrier(3, timeout=1)
    results = pp.RawArray("i", 3)
    victim = ctx.Process(target=_barrier_party, args=(barrier, results, 0))
    victim.start()
    _until(lambda: barrier.n_waiting == 1)
    _kill(victim)
    survivor = ctx.Process(target=_barrier_party, args=(barrier, results, 1))
    survivor.start()
    survivor.join(20)
    try:
        assert survivor.exitcode == 0
        assert results[1] == 2
    finally:
        if survivor.is_alive():
            survivor.kill()
            survivor.join()
