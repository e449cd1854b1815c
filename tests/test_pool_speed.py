"""The local engine's fast paths keep the stdlib's results: tasks never wait behind a running
one while a worker is idle (stealing queued tasks back), big results out of band."""
import os
import time

import pytest

import pyparallel as pp

pytestmark = pytest.mark.usefixtures("no_leaks")

np = pytest.importorskip("numpy")


def nap(x):
    time.sleep(x)
    return os.getpid()


def quick(x):
    return x * 2


def total(a):
    return float(a.sum())


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_quick_tasks_do_not_wait_behind_a_long_one(context):
    with pp.Pool(2, context=context) as p:
        p.map(quick, range(4))  # started, and the engine has seen short tasks
        long = p.apply_async(nap, (5,))
        quick_ones = [p.apply_async(quick, (i,)) for i in range(8)]
        assert [r.get(30) for r in quick_ones] == [2 * i for i in range(8)]
        assert not long.ready()  # each quick one ran beside the long one, none after it
        long.get(30)


def test_stolen_tasks_run_once_each(tmp_path):
    # Quick tasks queued behind long ones are taken back for the idle worker; every task
    # runs exactly once (each appends its number to a file), whoever wins each claim.
    path = str(tmp_path / "ran")
    with pp.Pool(2) as p:
        for _ in range(3):
            rs = [p.apply_async(_append, (path, i, 0.3 if i % 5 == 0 else 0)) for i in range(30)]
            assert [r.get(30) for r in rs] == list(range(30))
    with open(path) as f:
        ran = sorted(int(x) for x in f.read().split())
    assert ran == sorted(list(range(30)) * 3)


def _append(path, i, pause):
    time.sleep(pause)
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i


def test_stealing_keeps_maxtasksperchild():
    # A stolen task counts against the worker that runs it, not the one it was queued on:
    # both workers keep their limit, and the pool goes on with new workers.
    with pp.Pool(2, maxtasksperchild=2) as p:
        long = p.apply_async(nap, (1,))
        rs = [p.apply_async(nap, (0.01,)) for _ in range(6)]
        pids = [r.get(30) for r in rs] + [long.get(30)]
        assert all(pids.count(pid) <= 2 for pid in set(pids))


def test_stolen_task_with_spilled_arguments():
    arrays = [np.full(1 << 18, i, dtype=np.float64) for i in range(6)]  # 2 MiB each: spilled
    with pp.Pool(2) as p:
        long = p.apply_async(nap, (2,))
        rs = [p.apply_async(total, (a,)) for a in arrays]
        assert [r.get(30) for r in rs] == [float(a.sum()) for a in arrays]
        assert not long.ready()
        long.get(30)


def test_stolen_task_keeps_its_timeout():
    with pp.Pool(2) as p:
        long = p.apply_async(nap, (2,))
        stuck = p.apply_async(nap, (60,), task_timeout=0.5)
        with pytest.raises(pp.TaskTimeoutError):
            stuck.get(30)
        assert not long.ready()
        long.get(30)


# ---- big results out of band ----


def big(i):
    return np.full(1 << 19, i, dtype=np.float64)  # 4 MiB


def big_pair(i):
    return (np.arange(1 << 18, dtype=np.int64) + i, "label", np.zeros(3))


def _segment_of(a):
    """The shared segment an array's memory is in, or None."""
    b = a
    while isinstance(b, np.ndarray):
        b = b.base
    if isinstance(b, memoryview):
        b = b.obj
    return b if isinstance(b, pp._core.Segment) else None


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_big_results_are_views_of_a_shared_segment(context):
    with pp.Pool(2, context=context) as p:
        rs = p.map(big, range(8), chunksize=1)
        for i, a in enumerate(rs):
            assert a.dtype == np.float64 and a.shape == (1 << 19,) and (a == i).all()
            assert a.flags.writeable and _segment_of(a) is not None  # not copied out
        a = p.apply(big, (3,))
        a[:] = 1.0  # its own memory: writing it changes nothing else
        assert (p.apply(big, (4,)) == 4).all() and (rs[3] == 3).all()
        pairs = p.map(big_pair, range(4), chunksize=2)
        for i, (x, label, z) in enumerate(pairs):
            assert (x == np.arange(1 << 18) + i).all() and label == "label" and not z.any()


def test_result_segments_are_reused_once_let_go():
    with pp.Pool(1) as p:
        seen = []
        for _ in range(20):
            a = p.apply(big, (1,))
            seen.append(_segment_of(a).ino)
            del a
        assert len(set(seen)) <= 2  # the worker wrote the same segment again


def test_results_kept_alive_are_not_overwritten():
    with pp.Pool(2) as p:
        kept = [p.apply(big, (i,)) for i in range(70)]  # more than a worker's segments
        assert all((a == i).all() for i, a in enumerate(kept))


def test_too_many_result_segments_fall_back_to_the_ring(monkeypatch):
    from pyparallel import _tunables

    monkeypatch.setattr(_tunables, "RESULT_SEGMENTS_MAX", 3)
    with pp.Pool(2) as p:
        kept = p.map(big, range(12), chunksize=1)
        assert all((a == i).all() for i, a in enumerate(kept))
        mapped = sum(_segment_of(a) is not None for a in kept)
        assert 3 <= mapped <= 3 + 2 * 2  # (workers see the flag after a result or two)
        del kept
        again = p.map(big, range(2), chunksize=1)  # let go: segments again (below the cap)
        assert all(_segment_of(a) is not None for a in again)


def test_big_results_with_maxtasksperchild():
    with pp.Pool(2, maxtasksperchild=1) as p:
        rs = p.map(big, range(6), chunksize=1)  # each worker leaves right after its result
        assert all((a == i).all() for i, a in enumerate(rs))


# ---- a map's long chunks send their results in parts (wire.STREAM) ----

PART = 8192  # pyparallel._pool.local.wire.PART_ITEMS


def record(i):
    return ("kind", i, i * 3)


def fail_at(i):
    if i == 2 * PART + 5:
        raise KeyError(i)
    return (i, "x")


def die_at(i):
    if i == PART + 1:
        os._exit(7)
    return i


class Unpicklable:
    def __reduce__(self):
        raise TypeError("no pickling this")


def unpicklable_at(i):
    return Unpicklable() if i == 3 else i


def test_part_size_is_the_wire_constant():
    from pyparallel._pool.local import wire

    assert wire.PART_ITEMS == PART


@pytest.mark.parametrize("n", [PART, PART + 1, 2 * PART, 2 * PART + 1, 5 * PART + 77])
def test_streamed_chunks_give_every_result_in_order(n):
    items = [("kind", i) for i in range(n)]
    with pp.Pool(2) as p:
        # one chunk per worker: each longer than a part for most n
        assert p.map(record, range(n), (n + 1) // 2) == [record(i) for i in range(n)]
        assert p.starmap(max, [(i, 3) for i in range(n)], n) == [max(i, 3) for i in range(n)]
        assert p.map(len, items, n) == [2] * n
        mixed = p.map(str, range(n), n)  # not records: lists of strs
        assert mixed == [str(i) for i in range(n)]
        done = []
        r = p.map_async(record, range(n), n, callback=done.append)
        assert r.get(60) == done[0] == [record(i) for i in range(n)]


def test_a_failure_after_parts_were_sent_fails_the_map_and_the_pool_goes_on():
    with pp.Pool(2) as p:
        with pytest.raises(KeyError) as e:
            p.map(fail_at, range(4 * PART), 4 * PART)
        assert e.value.args == (2 * PART + 5,)
        errors = []
        r = p.map_async(fail_at, range(4 * PART), 2 * PART, error_callback=errors.append)
        with pytest.raises(KeyError):
            r.get(60)
        assert len(errors) == 1 and isinstance(errors[0], KeyError)
        assert p.map(record, range(3 * PART), 3 * PART) == [record(i) for i in range(3 * PART)]


def test_a_worker_dying_after_parts_were_sent():
    with pp.Pool(2) as p:
        with pytest.raises(pp.pool.WorkerLostError, match="exit"):
            p.map(die_at, range(3 * PART), 3 * PART)
        assert p.map(record, range(3 * PART), 3 * PART) == [record(i) for i in range(3 * PART)]


def test_a_part_that_cannot_be_pickled_is_a_maybe_encoding_error():
    from multiprocessing.pool import MaybeEncodingError

    with pp.Pool(2) as p:
        with pytest.raises(MaybeEncodingError, match="no pickling this"):
            p.map(unpicklable_at, range(2 * PART), 2 * PART)
        assert p.map(abs, range(-2 * PART, 0), 2 * PART) == list(range(2 * PART, 0, -1))


def test_imap_chunks_are_not_streamed():
    # imap must not hand out items of a chunk that fails later (as the stdlib's)
    with pp.Pool(2) as p:
        it = p.imap(fail_at, range(3 * PART), 3 * PART)
        with pytest.raises(KeyError):
            next(it)


def test_progress_advances_with_the_parts():
    seen = []
    with pp.Pool(2) as p:
        p.map(record, range(4 * PART), 4 * PART, progress=lambda done, total: seen.append(done))
    assert seen[-1] == 4 * PART
    assert len(seen) >= 4  # a count per part, not one for the whole chunk
