"""The Dask distributed backend: the same Pool calls on a Dask cluster.

``Pool(backend="dask", address="tcp://host:8786")`` (or ``client=`` a ``distributed.Client``)
hands the pool's jobs to this module instead of the local engine::

    caller thread                         Dask scheduler           Dask worker (any number)
    -------------                         --------------           ------------------------
    map(f, xs): Pool cuts chunks; here:
      f -> dumps_func (by value if needed)
      each chunk pickled; big buffers  --> client.scatter, once
        (>= 1 MB: arrays, bytes) become
        references to the scattered data
      consecutive chunks merged into one
      Dask task (adaptive: ~0.25 s each) --> client.submit -------> _run_task: initializer once
      at most ``processes`` in flight                               per worker process and pool,
                                                                    f(chunk) for each chunk,
    collector thread <-- done callbacks <-- task done <------------ results pickled (bytes)
      gathers, unpickles, completes results by position, submits the next tasks

- **Batching**: a Dask task costs about a millisecond of scheduler time, so a task here is a
  run of consecutive chunks of one job. The first tasks of a job carry one chunk each; from
  their measured run time (timed on the worker) the next ones take as many items as fit in
  :data:`TARGET_TASK_SECONDS` (growing at most :data:`GROWTH` times per step, and, for a map,
  no more than its share of what is left, so that every worker gets work). Results land by
  each chunk's start, so merging changes nothing the caller sees.
- **In flight**: ``processes`` Dask tasks run at once (default: the cluster's total threads
  when the pool starts), and as many again are queued on the cluster so that a worker never
  waits for the caller's round trip between two tasks; imap reads its input only as far as the caller's progress allows, so an
  endless generator works.
- **Big arguments** (numpy arrays, bytes-like objects of :data:`BIG_BYTES` or more, anywhere
  in the arguments) are scattered to the cluster once per pool (an array, while it lives and
  its contents stay the same: it is known by a hash of its data, so an array changed in place
  is sent again) or once per call (other objects), and tasks refer to them; a big function
  pickle too.
- **Errors**: a task's exception comes back with the remote traceback as its ``__cause__``
  (as from the local pool); a result that cannot be pickled is ``MaybeEncodingError``. The
  scheduler reschedules tasks of a lost worker itself (its ``allowed-failures`` setting); when
  it gives up (``KilledWorker``) the task is submitted again up to ``retries`` times, then
  fails with :class:`~.errors.WorkerLostError` naming it. An initializer that raises fails
  the pool's calls with :class:`~.errors.InitializerError`, as locally.
- **A lost scheduler** (killed, unreachable: the client cancels every future it holds) fails
  every pending call of the pool at once with ``ConnectionError``, and the later ones too.
- **Life cycle**: ``terminate()`` cancels the pool's outstanding futures on the cluster; a
  client the pool created is closed by ``terminate()``/``join()``, a client given by the user
  is left open.

The workers need pyparallel installed (this module runs the tasks there). Native kernels
(``pyparallel.kernels``) given to the pool still run in the caller's process (Pool's kernel
path), not on the cluster.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import io
import itertools
import math
import os
import pickle
import queue
import reprlib
import threading
import traceback
import uuid
import weakref
from dataclasses import dataclass, field
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError
from time import perf_counter

import distributed  # a missing distributed: Pool names the "dask" extra
import distributed.comm

from .. import _serialize
from .backend import BULK, MAP, STARMAP, Lifecycle, State
from .errors import InitializerError, PoolTerminatedError, TaskCancelledError, WorkerLostError
from .results import ApplyResult, ResultCompletedTwice

__all__ = ["DaskBackend", "TARGET_TASK_SECONDS", "BIG_BYTES"]

#: the run time a batched Dask task aims at (Dask costs ~1 ms per task)
TARGET_TASK_SECONDS = 0.25
#: how much bigger the next task of a job may be than its biggest so far
GROWTH = 16
#: arguments at least this big are scattered once instead of sent with each task
BIG_BYTES = 1 << 20
#: imap: items read beyond what the caller took, at most (or the Pool's own bound, if larger):
#: room for batched tasks, and a bound on the memory an endless input takes
LAZY_AHEAD_MAX = 8192
#: function pickles a worker process keeps loaded
_FUNC_CACHE = 64

_OPTIONS = ("address", "client", "connect_timeout", "retries")
#: seconds between the collector's looks at the client while tasks are in flight (a client
#: that lost its scheduler may never complete the tasks submitted since)
CONNECTION_POLL = 1.0


# ---- the worker side (runs in the Dask worker processes) ---------------------------------

_worker_lock = threading.Lock()
_worker_inits: dict = {}  # pool token -> None (the initializer ran) or its failure
_worker_funcs: collections.OrderedDict = collections.OrderedDict()  # pickle -> function


def _load_func(fb):
    func = _worker_funcs.get(fb)
    if func is None:
        func = pickle.loads(fb)
        with _worker_lock:
            _worker_funcs[fb] = func
            while len(_worker_funcs) > _FUNC_CACHE:
                _worker_funcs.popitem(last=False)
    return func


def _ensure_init(token, init):
    """Runs the pool's initializer once in this worker process; its failure, or None."""
    if init is None:
        return None
    with _worker_lock:
        if token not in _worker_inits:
            try:
                initializer, initargs = pickle.loads(init)
                initializer(*initargs)
                _worker_inits[token] = None
            except BaseException as e:  # noqa: BLE001 - reported with every task of the pool
                _worker_inits[token] = ExceptionWithTraceback(e, e.__traceback__)
        return _worker_inits[token]


class _Unpickler(pickle.Unpickler):
    """Resolves the references to scattered data (persistent ids: their Dask keys)."""

    def __init__(self, file, objs):
        super().__init__(file)
        self.objs = objs

    def persistent_load(self, pid):
        return self.objs[pid]


def _loads_chunk(data, keys, objs):
    if not keys:
        return pickle.loads(data)
    return _Unpickler(io.BytesIO(data), objs).load()


def _dump_results(elapsed, out):
    try:
        return pickle.dumps(("ok", elapsed, out), 5)
    except BaseException:  # noqa: BLE001 - find the results that cannot be pickled
        pass
    fixed = []
    for success, value in out:
        try:
            pickle.dumps(value, 5)
            fixed.append((success, value))
        except BaseException as e:  # noqa: BLE001 - a __reduce__ may raise anything
            try:
                wrapped = MaybeEncodingError(e, value)
                pickle.dumps(wrapped, 5)
            except BaseException:  # noqa: BLE001 - the value's repr itself fails
                wrapped = MaybeEncodingError(e, reprlib.repr(value))
            fixed.append((False, wrapped))
    return pickle.dumps(("ok", elapsed, fixed), 5)


def _run_task(token, init, fb, kind, chunks, keys, *big):
    """One Dask task: the chunks (pickles) of one job; returns the pickled list of
    (success, value) per chunk and the time the chunks took."""
    err = _ensure_init(token, init)
    if err is not None:
        return pickle.dumps(("init", err), 5)
    t0 = perf_counter()
    objs = dict(zip(keys, big))
    out = []
    try:
        func = _load_func(fb)
    except BaseException as e:  # noqa: BLE001 - every chunk fails with it
        failure = (False, ExceptionWithTraceback(e, e.__traceback__))
        return pickle.dumps(("ok", 0.0, [failure] * len(chunks)), 5)
    for data, ckeys in chunks:
        try:
            args = _loads_chunk(data, ckeys, objs)
            if kind == MAP:
                value = list(map(func, args))
            elif kind == STARMAP:
                value = list(itertools.starmap(func, args))
            elif kind == BULK:
                value = func(list(args))
            else:
                a, kw = args
                value = func(*a, **kw)
            out.append((True, value))
        except BaseException as e:  # noqa: BLE001 - the chunk's failure, whatever it raised
            out.append((False, ExceptionWithTraceback(e, e.__traceback__)))
        value = args = None
    return _dump_results(perf_counter() - t0, out)


# ---- the client side ----------------------------------------------------------------------


def _content_token(obj):
    """A hash of an array's type, shape, dtype and data (dask's own ``tokenize``)."""
    from dask.base import tokenize

    return tokenize(obj)


def _nbytes_if_big(obj):
    t = type(obj)
    if t is bytes or t is bytearray:
        n = len(obj)
    elif t is memoryview:
        n = obj.nbytes
    elif t.__name__ == "ndarray" and t.__module__ == "numpy":
        n = obj.nbytes
    else:
        return 0
    return n if n >= BIG_BYTES else 0


_big_pickler = None


def _big_pickler_class():
    """pyparallel's pickler (functions of __main__ by value) that turns big buffers into
    references to data scattered on the cluster."""
    global _big_pickler
    if _big_pickler is None:
        base = _serialize._Pickler.get()

        class BigPickler(base):
            def __init__(self, file, scatter):
                super().__init__(file, {}, (), 5)
                self.scatter = scatter
                self.keys = {}

            def persistent_id(self, obj):
                if not _nbytes_if_big(obj):
                    return None
                fut = self.scatter(obj)
                self.keys[fut.key] = fut
                return fut.key

        _big_pickler = BigPickler
    return _big_pickler


@dataclass(slots=True, eq=False)
class _Enc:
    """One chunk, encoded: its items and its pickle, with the scattered data it refers to."""

    start: int
    count: int
    data: bytes
    keys: dict  # scatter key -> Future


@dataclass(slots=True, eq=False)
class _Task:
    job: object
    parts: list  # _Enc records, consecutive chunks of the job
    items: int
    key: str = ""
    future: object = None
    tries: int = 0


@dataclass(slots=True, eq=False)
class _JobState:
    fb: object  # the function pickle, or the Future of it scattered
    pending: collections.deque = field(default_factory=collections.deque)  # eager: _Enc left
    left: int = 0  # eager: items not yet submitted
    read: int = 0  # lazy: items read from the source
    exhausted: bool = False
    per_item: float | None = None  # measured seconds per item
    biggest: int = 0  # most items in one task so far
    tasks: int = 0  # its tasks in flight
    memo: dict = field(default_factory=dict)  # id -> (object, Future) scattered for this call


class DaskWorker:
    """What ``pool._pool`` lists for a Dask worker: its address, pid, name."""

    def __init__(self, backend, address, pid, name):
        self._backend = weakref.ref(backend)
        self.address = address
        self.pid = pid
        self.name = name
        self.exitcode = None

    def is_alive(self):
        b = self._backend()
        if b is None:
            return False
        try:
            return self.address in b.client.scheduler_info(n_workers=-1)["workers"]
        except Exception:  # noqa: BLE001 - the cluster is gone
            return False

    def __repr__(self):
        return f"<DaskWorker {self.address} pid={self.pid}>"


class DaskBackend:
    """Runs a Pool's jobs on a Dask distributed cluster (see the module docstring).

    Options (passed through ``Pool(backend="dask", ...)``): ``address`` (the scheduler's,
    e.g. "tcp://host:8786") or ``client`` (a ``distributed.Client``; left open by the pool);
    ``connect_timeout`` (seconds, default 10) to reach the scheduler; ``retries`` (default 2):
    how many times a task is submitted again after the cluster gave up on it (KilledWorker).
    """

    start_method = None

    def __init__(self, processes, initializer, initargs, maxtasksperchild, cache, *,
                 address=None, client=None, connect_timeout=10, retries=2):
        if maxtasksperchild is not None:
            raise ValueError("maxtasksperchild is not supported by the dask backend "
                             "(Dask manages its worker processes itself)")
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) \
                or not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be a positive number of seconds, "
                             f"not {connect_timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        if client is not None and address is not None:
            raise TypeError("give the dask backend address= or client=, not both")
        if client is not None and not isinstance(client, distributed.Client):
            raise TypeError(f"client must be a distributed.Client, not {type(client).__name__}")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a str such as 'tcp://host:8786', not "
                            f"{type(address).__name__}")
        self.lifecycle = Lifecycle()
        self.cache = cache
        self.retries = retries
        self.token = uuid.uuid4().hex
        self.pickles = _serialize.FunctionPickles()
        # the initializer is pickled first: one that cannot be pickled fails before connecting
        self.init = None
        if initializer is not None:
            self.init = _serialize.dumps((initializer, tuple(initargs)))
        self.owned = client is None
        if client is None:
            if address is None:
                try:
                    client = distributed.get_client()
                except ValueError:
                    raise ValueError("the dask backend needs address='tcp://host:port' or "
                                     "client=a distributed.Client") from None
                self.owned = False
            else:
                client = _connect(address, connect_timeout)
        self.client = client
        self.address = getattr(client.scheduler, "address", address)
        try:
            if processes is None:
                processes = sum(client.nthreads().values())
                if processes == 0:
                    try:
                        client.wait_for_workers(1, timeout=connect_timeout)
                    except (TimeoutError, OSError) as e:
                        raise ConnectionError(
                            f"the Dask cluster at {self.address} has no workers (none "
                            f"joined within {connect_timeout} s)") from e
                    processes = sum(client.nthreads().values())
        except BaseException:
            if self.owned:
                client.close()
            raise
        self.processes = max(1, processes)
        # ``processes`` tasks run, as many again wait on the cluster: a worker that finishes
        # one starts the next at once instead of waiting for our round trip
        self.window = 2 * self.processes
        self.lock = threading.Lock()
        self.jobs = []  # jobs with chunks not yet submitted, in order
        self.tasks = {}  # Dask key -> _Task in flight
        self.counter = itertools.count()
        # id -> (weakref, token of the data, Future): arrays scattered, while they live
        self.arrays = {}
        self.funcs = {}  # big function pickle -> its Future
        self.broken = None
        # counts, for tests and benchmarks: Dask tasks submitted, objects scattered, bytes of
        # task payloads sent (chunk pickles, not the scattered data)
        self.submitted = self.scattered = self.sent_bytes = 0
        self.done_q = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._collect, name="pyparallel-dask-collector",
                                       daemon=True)
        self.thread.start()
        self.closed_client = False
        _backends.add(self)

    # ---- encoding (self.lock held, or before the job is visible) ----

    def _scatter(self, obj, memo):
        """The Future of ``obj`` on the cluster, scattered once per call (``memo``: one call's
        objects, by identity: a call's arguments are taken as they are when it is made) and
        across calls while it lives with the same data (by a hash of its contents: an array
        changed in place between two calls is sent again, as the local pool would send it)."""
        oid = id(obj)
        ent = memo.get(oid)
        if ent is not None:
            return ent[1]
        ent = self.arrays.get(oid)
        token = None
        if ent is not None and ent[0]() is obj:
            token = _content_token(obj)
            if ent[1] == token:
                memo[oid] = (obj, ent[2])
                return ent[2]
        fut = self.client.scatter(obj, hash=False)
        self.scattered += 1
        memo[oid] = (obj, fut)
        try:
            arrays = self.arrays
            ref = weakref.ref(obj, lambda _r, oid=oid: arrays.pop(oid, None))
        except TypeError:  # bytes and the like: once per call
            return fut
        arrays[oid] = (ref, token if token is not None else _content_token(obj), fut)
        return fut

    def _encode(self, chunk, memo):
        args = chunk.args
        bufs = []
        data = None
        try:
            data = pickle.dumps(args, 5, buffer_callback=bufs.append)
            if bufs or len(data) >= BIG_BYTES or b"__main__" in data:
                data = None
        except (pickle.PicklingError, AttributeError, TypeError):
            data = None
        bufs = None
        if data is not None:
            return _Enc(chunk.start, chunk.count, data, {})
        f = io.BytesIO()
        p = _big_pickler_class()(f, lambda obj: self._scatter(obj, memo))
        p.dump(args)
        return _Enc(chunk.start, chunk.count, f.getvalue(), p.keys)

    def _func(self, func):
        fb = self.pickles.dumps(func)
        if len(fb) < BIG_BYTES:
            return fb
        fut = self.funcs.get(fb)
        if fut is None:
            fut = self.funcs[fb] = self.client.scatter(fb, hash=False)
            self.scattered += 1
        return fut

    # ---- scheduling (self.lock held) ----

    def _limit(self, st, lazy):
        """How many items the job's next task takes."""
        if st.per_item is None:
            return 1  # one chunk, to measure
        limit = int(TARGET_TASK_SECONDS / max(st.per_item, 1e-9))
        limit = min(limit, max(st.biggest, 1) * GROWTH)
        if not lazy:
            limit = min(limit, math.ceil(st.left / self.processes))
        return max(limit, 1)

    def _take(self, job, done):
        """The job's next task, or None (nothing to send now)."""
        st = job.extra["dask"]
        limit = self._limit(st, job.lazy)
        parts = []
        items = 0
        if not job.lazy:
            while st.pending and (not parts or items + st.pending[0].count <= limit):
                enc = st.pending.popleft()
                parts.append(enc)
                items += enc.count
            st.left -= items
            if not st.pending:
                st.exhausted = True
        else:
            result = job.result
            while not st.exhausted and (not parts or items < limit):
                ahead = job.ahead
                if ahead:
                    ahead = max(ahead, min(2 * self.processes * limit, LAZY_AHEAD_MAX))
                    if result._issued - result._taken >= ahead:
                        result._waker = self._kick  # the caller is behind: wait for it
                        if result._issued - result._taken >= ahead:
                            break
                        result._waker = None
                try:
                    chunk = next(job.chunks)
                except StopIteration:
                    st.exhausted = True
                    done.append((result, None, "length", st.read))
                    break
                if isinstance(chunk, BaseException):  # the input iterator raised
                    done.append((result, st.read, 1, False, chunk))
                    st.read += 1
                    continue
                st.read = chunk.start + chunk.count
                result._issued += chunk.count
                try:
                    enc = self._encode(chunk, st.memo)
                except Exception as e:  # noqa: BLE001 - that item cannot be sent: it fails
                    done.append((result, chunk.start, chunk.count, False, e))
                    continue
                parts.append(enc)
                items += enc.count
        if not parts:
            return None
        return _Task(job, parts, items)

    def _submit_task(self, task):
        job = task.job
        st = job.extra["dask"]
        keys = {}
        for enc in task.parts:
            keys.update(enc.keys)
        if not task.key or task.tries:
            task.key = f"pyparallel-{self.token[:12]}-{next(self.counter)}"
        fut = self.client.submit(
            _run_task, self.token, self.init, st.fb, job.kind,
            [(enc.data, tuple(enc.keys)) for enc in task.parts], tuple(keys), *keys.values(),
            key=task.key, pure=False)
        task.future = fut
        self.submitted += 1
        self.sent_bytes += sum(len(enc.data) for enc in task.parts)
        self.tasks[task.key] = task
        st.tasks += 1
        fut.add_done_callback(self.done_q.put)

    def _pump(self, done):
        """Submits tasks while fewer than ``window`` are in flight."""
        if self.broken is not None:
            self._fail_everything(self.broken, done)
            return
        if self.lifecycle.state is State.TERMINATE:
            return
        i = 0
        while len(self.tasks) < self.window and i < len(self.jobs):
            job = self.jobs[i]
            if job.cancelled:
                del self.jobs[i]
                continue
            task = self._take(job, done)
            if job.extra["dask"].exhausted:
                del self.jobs[i]
            elif task is None:
                i += 1
            if task is not None:
                try:
                    self._submit_task(task)
                except Exception as e:  # noqa: BLE001 - the cluster refused it
                    for enc in task.parts:
                        done.append((job.result, enc.start, enc.count, False, e))

    def _fail_everything(self, err, done):
        futs = [t.future for t in self.tasks.values()]
        self.tasks.clear()
        self.jobs.clear()
        for result in list(self.cache.values()):
            done.append((result, None, "abort", err))
        if futs and not isinstance(err, ConnectionError):  # no scheduler to tell
            self._cancel_futures(futs)

    def _connection_lost(self):
        """The client lost its scheduler (or was closed): the pool cannot run calls. Every
        pending call fails (the client cancelled the futures it held; those submitted since
        would never complete), and the later ones."""
        if self.broken is None:
            self.broken = ConnectionError(
                f"the Dask client lost the connection to the scheduler at {self.address} "
                f"(client {self.client.status}): the pool's calls cannot complete")

    def _client_running(self):
        return getattr(self.client, "status", "running") == "running"

    def _cancel_futures(self, futs):
        try:
            self.client.cancel(futs, force=True)
        except Exception:  # noqa: BLE001 - a client or cluster already gone
            pass

    # ---- completion ----

    def _complete(self, done):
        """Completes results outside the lock (callbacks run here). Entries:
        (result, start, count, success, value[, single]); (result, None, "abort", err);
        (result, None, "length", n)."""
        for entry in done:
            result = entry[0]
            try:
                if entry[1] is None:
                    if entry[2] == "abort":
                        result._abort(entry[3])
                    else:
                        result._set_length(entry[3])
                    continue
                _, start, count, success, value = entry[:5]
                if success and len(entry) > 5 and entry[5] and not isinstance(result,
                                                                              ApplyResult):
                    value = [value]  # imap with chunksize 1: one item
                result._set_chunk(start, count, success, value)
            except ResultCompletedTwice:  # a bug of this backend: say so, go on
                traceback.print_exc()
            except BaseException as e:  # noqa: BLE001 - user code (a callback, unpickling)
                try:
                    result._abort(e)
                except BaseException:  # noqa: BLE001
                    traceback.print_exc()
        done.clear()

    def _finished(self, tasks, done):
        """Tasks whose futures are done: their results, or their resubmission."""
        if not self._client_running():  # nothing can be gathered, or submitted again
            with self.lock:
                self._connection_lost()
            for t in tasks:
                t.job.extra["dask"].tasks -= 1
                if not t.job.cancelled:
                    self._fail_task(t, self.broken, done)
            return []
        ok = [t for t in tasks if t.future.status == "finished"]
        values = {}
        if ok:
            try:
                got = self.client.gather([t.future for t in ok])
                values = {t.key: v for t, v in zip(ok, got)}
            except Exception:  # noqa: BLE001 - one of them failed: one at a time
                for t in ok:
                    try:
                        values[t.key] = t.future.result()
                    except BaseException as e:  # noqa: BLE001
                        values[t.key] = e
        resubmit = []
        for t in tasks:
            job = t.job
            st = job.extra["dask"]
            st.tasks -= 1
            if job.cancelled:
                continue
            if t.key in values:
                raw = values[t.key]
                if isinstance(raw, BaseException):
                    self._fail_task(t, raw, done)
                    continue
                try:
                    msg = pickle.loads(raw)
                except BaseException as e:  # noqa: BLE001 - a result that cannot load here
                    self._fail_task(t, e, done)
                    continue
                if msg[0] == "init":
                    self._init_failed(msg[1])
                    continue
                _, elapsed, out = msg
                new = elapsed / max(t.items, 1)
                st.per_item = new if st.per_item is None else 0.5 * (st.per_item + new)
                st.biggest = max(st.biggest, t.items)
                for enc, (success, value) in zip(t.parts, out):
                    done.append((job.result, enc.start, enc.count, success, value, job.single))
                continue
            status = t.future.status
            try:
                exc = t.future.exception(timeout=5) if status == "error" else None
            except BaseException as e:  # noqa: BLE001
                exc = e
            if isinstance(exc, distributed.KilledWorker) and t.tries < self.retries:
                t.tries += 1
                resubmit.append(t)
                continue
            if isinstance(exc, distributed.KilledWorker):
                err = WorkerLostError(
                    f"the Dask task {t.key} (items {t.parts[0].start}..."
                    f"{t.parts[-1].start + t.parts[-1].count - 1} of the call) was lost with "
                    f"its worker: the cluster gave up on it ({exc}) after "
                    f"{t.tries + 1} submission(s)")
                err.__cause__ = exc
            elif status == "cancelled" and not self._client_running():
                self._connection_lost()  # the client cancels its futures when it does
                err = self.broken
            elif status == "cancelled" or exc is None:
                err = TaskCancelledError(f"the Dask task {t.key} was cancelled on the cluster")
            else:
                err = exc
            self._fail_task(t, err, done)
        return resubmit

    def _fail_task(self, task, err, done):
        for enc in task.parts:
            done.append((task.job.result, enc.start, enc.count, False, err))

    def _init_failed(self, cause):
        if self.broken is None:
            err = InitializerError(f"the pool's initializer raised in a Dask worker: {cause!r}")
            err.__cause__ = cause
            self.broken = err

    def _collect(self):
        try:
            self._collect_loop()
        except BaseException:  # pragma: no cover - a bug: do not leave callers waiting
            traceback.print_exc()
            self.lifecycle.to(State.TERMINATE)
            done = []
            with self.lock:
                self._fail_everything(PoolTerminatedError("pyparallel dask collector failed"),
                                      done)
            self._complete(done)

    def _collect_loop(self):
        q = self.done_q
        done = []
        while True:
            try:
                futs = [q.get(timeout=CONNECTION_POLL)]
            except queue.Empty:
                futs = []
                with self.lock:
                    lost = bool(self.tasks) and self.broken is None \
                        and not self._client_running()
                if not lost:
                    continue
                with self.lock:
                    self._connection_lost()
            while True:
                try:
                    futs.append(q.get_nowait())
                except queue.Empty:
                    break
            if self.lifecycle.state is State.TERMINATE:
                return
            with self.lock:
                tasks = []
                for f in futs:
                    if f is None:
                        continue
                    t = self.tasks.get(f.key)
                    if t is not None and t.future is f:
                        del self.tasks[f.key]
                        tasks.append(t)
            # gathering waits on the cluster: outside the lock
            resubmit = self._finished(tasks, done) if tasks else []
            tasks = futs = None
            with self.lock:
                if self.lifecycle.state is State.TERMINATE:
                    return
                for t in resubmit:
                    try:
                        self._submit_task(t)
                    except Exception as e:  # noqa: BLE001
                        self._fail_task(t, e, done)
                if self.broken is not None:
                    self._fail_everything(self.broken, done)
                else:
                    self._pump(done)
            self._complete(done)
            with self.lock:
                if self.lifecycle.state is State.CLOSE and not self.tasks and not self.jobs:
                    return

    # ---- the Backend protocol ----

    def _check_running(self):
        if self.lifecycle.state is not State.RUN:
            raise ValueError("Pool not running")

    def submit(self, job) -> None:
        self._check_running()
        if self.broken is not None:  # nothing to send: _pump fails the call at once
            st = job.extra["dask"] = _JobState(None)
        else:
            st = job.extra["dask"] = _JobState(self._func(job.func))
        if not job.lazy and self.broken is None:
            for chunk in job.chunks:  # every chunk is encoded before anything is sent
                enc = self._encode(chunk, st.memo)
                st.pending.append(enc)
                st.left += enc.count
        done = []
        with self.lock:
            self._check_running()
            self.jobs.append(job)
            self._pump(done)
        self._complete(done)

    def help(self, result) -> None:
        """Nothing to collect in the caller's thread: Dask's own threads deliver results."""

    def _kick(self):
        """The caller took imap results: submit more."""
        done = []
        with self.lock:
            if self.lifecycle.state is not State.TERMINATE:
                self._pump(done)
        self._complete(done)

    def cancel_all(self, results, error=None, stop="kill") -> None:
        """:meth:`cancel` for each of ``results``, failing it with ``error([])`` (``stop``, how
        a local worker is stopped, means nothing here)."""
        for result in results:
            self.cancel(result, error)

    def cancel(self, result, error=None) -> None:
        """Ctrl-C in a caller waiting for ``result``: cancel its futures on the cluster, drop
        its chunks, fail it with TaskCancelledError (or ``error([])``); the pool stays
        usable."""
        if self.lifecycle.state is State.TERMINATE:
            return
        done = []
        with self.lock:
            for job in self.jobs:
                if job.result is result:
                    job.cancelled = True
            victims = [k for k, t in self.tasks.items() if t.job.result is result]
            futs = []
            for k in victims:
                t = self.tasks.pop(k)
                t.job.cancelled = True
                futs.append(t.future)
            self._pump(done)
        if futs:
            self._cancel_futures(futs)
        done.append((result, None, "abort",
                     TaskCancelledError("the call was interrupted (KeyboardInterrupt)")
                     if error is None else error([])))
        self._complete(done)

    def close(self) -> None:
        if self.lifecycle.to(State.CLOSE):
            done = []
            with self.lock:
                for job in self.jobs:  # nobody may read further: feed the rest unthrottled
                    job.ahead = 0
                    if getattr(job.result, "_waker", None) is not None:
                        job.result._waker = None
                self._pump(done)
            self._complete(done)
            self.done_q.put(None)  # the collector checks whether it is done

    def terminate(self) -> None:
        if not self.lifecycle.to(State.TERMINATE):
            return
        with self.lock:
            futs = [t.future for t in self.tasks.values()]
            self.tasks.clear()
            self.jobs.clear()
            self.arrays.clear()
            self.funcs.clear()
        if futs:
            self._cancel_futures(futs)
        err = PoolTerminatedError("the pool was terminated before the task completed")
        for result in list(self.cache.values()):
            result._abort(err)
        self.done_q.put(None)
        if self.thread is not threading.current_thread():
            self.thread.join(10)
        self._close_client()

    def _close_client(self):
        if self.owned and not self.closed_client:
            self.closed_client = True
            try:
                self.client.close(timeout=10)
            except Exception:  # noqa: BLE001 - a cluster already gone
                pass

    def join(self) -> None:
        if self.thread is not threading.current_thread():
            self.thread.join()
        with self.lock:
            self.arrays.clear()
            self.funcs.clear()
        self._close_client()

    def workers(self) -> list:
        try:
            pids = self.client.run(os.getpid)
            names = self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception:  # noqa: BLE001 - the cluster is gone: no workers
            return []
        return [DaskWorker(self, addr, pid, names.get(addr, {}).get("name"))
                for addr, pid in sorted(pids.items())]

    def repopulate(self) -> None:
        """Nothing to do: the cluster (its nannies) replaces lost workers."""


def _connect(address, timeout):
    """A client of the scheduler at ``address``, or ConnectionError within ``timeout``.

    The scheduler is first reached from a short-lived event loop of our own: a Client that
    fails to connect keeps its event-loop thread running, so it is made only once the
    scheduler answered."""
    deadline = perf_counter() + timeout
    failure = []

    async def probe():
        comm = await distributed.comm.connect(address, timeout=timeout)
        await comm.close()

    def run():
        try:
            asyncio.run(probe())
        except BaseException as e:  # noqa: BLE001 - reported in the caller
            failure.append(e)

    t = threading.Thread(target=run, name="pyparallel-dask-connect", daemon=True)
    t.start()
    t.join(timeout + 5)
    if t.is_alive() or failure:
        err = failure[0] if failure else TimeoutError(f"no answer within {timeout} s")
        raise ConnectionError(f"cannot reach the Dask scheduler at {address} within "
                              f"{timeout} s: {err}") from err
    try:
        return distributed.Client(address, timeout=max(deadline - perf_counter(), 1),
                                  set_as_default=False)
    except (OSError, TimeoutError) as e:
        _close_failed_client(e)
        raise ConnectionError(f"cannot reach the Dask scheduler at {address} within "
                              f"{timeout} s: {e}") from e


def _close_failed_client(exc):
    """Stops the event loop of a Client whose constructor raised (found in the traceback)."""
    tb = exc.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, distributed.Client):
            try:
                obj.close()
            except Exception:  # noqa: BLE001
                pass
            return
        tb = tb.tb_next


_backends = weakref.WeakSet()


def _terminate_all():  # interpreter exit: cancel what the pools left on the cluster
    for b in list(_backends):
        try:
            b.terminate()
        except Exception:  # noqa: BLE001
            pass


atexit.register(_terminate_all)
