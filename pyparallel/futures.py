"""``concurrent.futures.ProcessPoolExecutor`` on pyparallel's pool.

:class:`ProcessPoolExecutor` has the standard executor's API and behaviour: ``submit``
returns real :class:`concurrent.futures.Future` objects (``as_completed``, ``wait``,
``add_done_callback`` and ``cancel`` work on them), ``map(fn, *iterables, timeout=None,
chunksize=1, buffersize=None)``, ``shutdown(wait=True, cancel_futures=False)``, the context
manager; a task's exception is re-raised with the worker's traceback as its ``__cause__``
(``concurrent.futures.process._RemoteTraceback``), and exceptions that are not ``Exception``
(SystemExit, KeyboardInterrupt raised by the task) come back the same way, as in the stdlib.

How a call travels::

    submit(fn, *a) -> Future (PENDING) -> held here while the pool has 2 * max_workers calls
                      |                   (these can still be cancelled, as in the stdlib,
                      v                    whose call queue is bounded the same way)
                      pool.apply_async(...)  -> Future RUNNING -> worker runs fn(*a)
    Future done  <--  the pool's callback (its collector thread) sets the result and
                      feeds the next held calls to the pool; the future's done-callbacks
                      run on the executor's callback thread (started while there are some),
                      so that one that blocks never holds up the delivery of results

Where it differs from the stdlib, on purpose:

- **A dead worker fails one future.** The stdlib marks the whole executor broken when a worker
  dies (every pending future and every later ``submit`` raise ``BrokenProcessPool``). Here the
  future whose call was running fails with :class:`BrokenWorkerError` (a ``BrokenProcessPool``
  and a :class:`pyparallel.pool.WorkerLostError`, naming the worker's pid and signal or exit
  code), the pool replaces the worker, and the other futures and later submits go on.
- **Warm workers by default.** ``reuse=True`` (keyword only, the default) runs on the
  process's shared pool (:func:`pyparallel.get_reusable_pool`): a second executor with the
  same arguments starts no processes. ``shutdown(wait=True)`` then waits for this executor's
  futures but leaves the workers running for the next one; ``reuse=False`` gives the executor
  its own workers, which shutdown stops, as in the stdlib.
- **map batches its calls.** With the default ``chunksize=1`` (and no ``buffersize``),
  ``map`` sends the items in batches (up to 512 per task, at least 8 tasks per worker) yet
  keeps per-item semantics: results in order, the first failing item's exception raised
  after the items before it. Calls after a failing one in the same batch do not run.
- **Functions need not be importable**: lambdas and notebook functions are sent by value.
- **A result that cannot be pickled** fails its future with
  ``multiprocessing.pool.MaybeEncodingError`` (the stdlib gives the pickling error itself).
- ``max_tasks_per_child`` works under every start method; without ``mp_context`` the start
  method is pyparallel's default, not "spawn". With an explicit fork context it is refused, as
  in the stdlib.
"""
from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import weakref
from concurrent.futures import _base
from concurrent.futures.process import BrokenProcessPool, _ExceptionWithTraceback

try:
    from concurrent.futures.process import _RemoteTraceback
except ImportError:  # pragma: no cover - present on every supported Python
    _RemoteTraceback = None

import multiprocessing.pool as _mpp

from . import _reuse
from ._cpu import cpu_count
from ._pool.errors import describe_exit
from .pool import InitializerError, Pool, PoolTerminatedError, WorkerLostError

__all__ = ["ProcessPoolExecutor", "BrokenWorkerError", "InitializerFailedError",
           "BrokenProcessPool"]

#: calls handed to the pool at once, per worker; the rest wait in the executor (cancellable)
IN_FLIGHT_PER_WORKER = 2
#: map's automatic batches: at most this many items per task ...
MAX_BATCH = 512
#: ... and at least this many tasks per worker
TASKS_PER_WORKER = 8
#: seconds the callback thread waits for more callbacks before it leaves
CALLBACK_LINGER = 1.0


class BrokenWorkerError(BrokenProcessPool, WorkerLostError):
    """The worker running this future's call died (killed, crashed, exited). Only this
    future fails; the pool replaced the worker."""


class InitializerFailedError(BrokenProcessPool, InitializerError):
    """The executor's initializer raised in a worker: the executor cannot run calls."""


# ---- what runs in the worker --------------------------------------------------------------


class _Call:
    """``fn(*args, **kwargs)`` in the worker, as (True, value) or (False, the exception with
    its traceback): every exception comes back, BaseException included, as in the stdlib."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        return _Call, (self.fn,)

    def __call__(self, *args, **kwargs):
        try:
            return (True, self.fn(*args, **kwargs))
        except BaseException as e:
            return (False, _ExceptionWithTraceback(e, e.__traceback__))


class _Failed:
    """A batch's items up to a failing one: their values and the exception."""

    __slots__ = ("values", "exc")

    def __init__(self, values, exc):
        self.values = values
        self.exc = exc

    def __reduce__(self):
        return _Failed, (self.values, self.exc)


class _Batch:
    """Runs a batch of map's calls. ``per_item``: stop at the first failing call and return
    the values before it with the exception (map's chunksize=1 semantics); otherwise the
    whole chunk fails as one (the stdlib's chunksize > 1). ``star``: items are argument
    tuples (several iterables), else single arguments."""

    __slots__ = ("fn", "per_item", "star")

    def __init__(self, fn, per_item, star):
        self.fn = fn
        self.per_item = per_item
        self.star = star

    def __reduce__(self):
        return _Batch, (self.fn, self.per_item, self.star)

    def __call__(self, items):
        fn = self.fn
        out = []
        try:
            if self.star:
                for args in items:
                    out.append(fn(*args))
            else:
                for x in items:
                    out.append(fn(x))
        except BaseException as e:
            exc = _ExceptionWithTraceback(e, e.__traceback__)
            return _Failed(out if self.per_item else [], exc)
        return out  # a plain list: lists of numbers travel packed


# ---- the executor's state (shared with the pool's callbacks) -------------------------------


class Future(_base.Future):
    """A ``concurrent.futures.Future`` whose ``result()``/``exception()`` first wait on the
    pool's own result (``AsyncResult.wait``), which collects a result that comes within
    microseconds itself instead of waiting for the pool's collector thread to wake.

    Its done-callbacks run on its executor's callback thread (as the stdlib's run on the
    executor's manager thread), never on the thread that delivers results: a callback that
    blocks (on another future's result, say) holds up only the callbacks after it."""

    _pp_async = None  # the pool's AsyncResult, once the call was handed to the pool
    _pp_core = None  # the executor's _Core, which runs the callbacks
    _pp_defer_cancel = False  # cancelled by the executor: callbacks on its thread too

    def _pp_wait(self, timeout):
        # Ctrl-C interrupts this wait only: the call goes on and the future completes
        # (cancel() is what cancels a call), as with the stdlib.
        ar = self._pp_async
        if ar is None or self._state == _base.FINISHED:
            return timeout
        if timeout is None:
            ar._wait()
            return None
        end = time.monotonic() + timeout
        ar._wait(timeout)
        return max(0.0, end - time.monotonic())

    def _invoke_callbacks(self):
        # A future cancelled by the user's cancel() runs its callbacks in that thread, as
        # in the stdlib; a finished one (or one the executor cancels) on the callback thread.
        core = self._pp_core
        if core is None or not self._done_callbacks or (
                self._state != _base.FINISHED and not self._pp_defer_cancel):
            super()._invoke_callbacks()
        else:
            core.defer_callbacks(self)

    def _pp_cancel(self):
        """cancel() by the executor (shutdown's cancel_futures)."""
        self._pp_defer_cancel = True
        return self.cancel()


def _run_callbacks(future):
    """A future's done-callbacks. An exception of any kind from one is logged as the stdlib
    logs an Exception (a SystemExit or KeyboardInterrupt there kills the executor's manager
    thread, after which its futures never complete): it ends that callback only."""
    for callback in future._done_callbacks:
        try:
            callback(future)
        except BaseException:  # noqa: BLE001 - see above
            _base.LOGGER.exception("exception calling callback for %r", future)

    def result(self, timeout=None):
        return super().result(self._pp_wait(timeout))

    def exception(self, timeout=None):
        return super().exception(self._pp_wait(timeout))



def _remote_cause(exc):
    """multiprocessing's RemoteTraceback as cause becomes concurrent.futures' own."""
    cause = exc.__cause__
    if _RemoteTraceback is not None and isinstance(cause, _mpp.RemoteTraceback):
        exc.__cause__ = _RemoteTraceback(cause.tb)
    return exc


def _translate(exc, broken=None):
    """The pool's own failures as the executor reports them; ``broken(msg)`` is told when
    the pool can run no more calls."""
    if isinstance(exc, WorkerLostError):
        err = BrokenWorkerError(f"{exc} (only this future fails: the pool goes on)")
        err.__cause__ = exc
        return err
    if isinstance(exc, InitializerError):
        msg = ("a process in the process pool failed in the initializer, the process pool "
               f"is not usable anymore: {exc.__cause__!r}")
        err = InitializerFailedError(msg)
        err.__cause__ = exc.__cause__ if exc.__cause__ is not None else exc
    elif isinstance(exc, PoolTerminatedError):
        msg = f"the executor's pool was terminated: {exc}"
        err = BrokenProcessPool(msg)
        err.__cause__ = exc
    else:
        return _remote_cause(exc)
    if broken is not None:
        broken(msg)
    return err


class _Core:
    """Everything the executor's calls need: the pool (or lease), the held calls, the
    counters. The pool's callbacks hold this, not the executor, so an executor that is
    dropped without shutdown is collected (and shuts down without waiting, as the stdlib's
    does)."""

    def __init__(self, pool, lease, max_workers, per_worker=IN_FLIGHT_PER_WORKER):
        self.pool = pool
        self.lease = lease  # None for a private pool
        self.limit = max(1, per_worker * max_workers)
        self.lock = threading.Lock()
        self.held = collections.deque()  # (future, call, args, kwargs, decode)
        self.in_flight = 0
        self.outstanding = 0  # futures not done yet (held or in flight)
        self.idle = threading.Condition(self.lock)
        self.shutdown = False
        self.broken = None  # message once the executor cannot run calls
        self.released = False
        # done-callbacks to run (futures), on callback_thread while there are some
        self.callbacks = collections.deque()
        self.callbacks_pending = 0  # futures queued or running their callbacks
        self.callback_thread = None
        self.sent = weakref.WeakSet()  # futures handed to the pool (for terminate_workers)

    # -- submission --

    def submit(self, future, call, args, kwargs, decode):
        """Queue one call (lock not held). Raises as the stdlib's submit does."""
        with self.lock:
            if self.broken:
                raise BrokenProcessPool(self.broken)
            if self.shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            self.outstanding += 1
            if self.held or self.in_flight >= self.limit:
                future._pp_core = self
                self.held.append((future, call, args, kwargs, decode))
                return
            self.in_flight += 1
        future._pp_core = self
        future.set_running_or_notify_cancel()
        self._send(future, call, args, kwargs, decode)

    def _send(self, future, call, args, kwargs, decode):
        """Hands one call to the pool (lock not held; the future is RUNNING)."""
        core = self

        if decode:
            def done(value):
                future._pp_async = None
                try:
                    ok, v = value
                    if ok:
                        future.set_result(v)
                    else:
                        future.set_exception(v)
                finally:
                    core._finished()
        else:
            def done(value):
                future._pp_async = None
                try:
                    future.set_result(value)
                finally:
                    core._finished()

        def failed(exc):
            future._pp_async = None
            try:
                future.set_exception(_translate(exc, core._break))
            finally:
                core._finished()

        self.sent.add(future)
        try:
            future._pp_async = self.pool.apply_async(call, args, kwargs, done, failed)
        except ValueError as e:
            if str(e).startswith("Pool not running"):  # terminated by someone else
                err = BrokenProcessPool(f"the executor's pool is not running: {e}")
                self._break(str(err))
                e = err
            future.set_exception(e)
            self._finished()
        except BaseException as e:  # could not pickle the call: this future fails
            if not isinstance(e, Exception):
                with self.lock:
                    self.in_flight -= 1
                    self.outstanding -= 1
                    self.idle.notify_all()
                future.set_exception(e)
                raise
            future.set_exception(e)
            self._finished()

    def _break(self, msg):
        """No more calls: fail the held ones."""
        with self.lock:
            if self.broken is None:
                self.broken = msg
            held, self.held = list(self.held), collections.deque()
        for future, *_ in held:
            if future.set_running_or_notify_cancel():
                future.set_exception(BrokenProcessPool(msg))
            self._finished(sent=False)

    def _finished(self, sent=True):
        """A future is done: feed the pool from the held calls; let go of the pool when
        shut down and idle."""
        batch = []
        with self.lock:
            if sent:
                self.in_flight -= 1
            self.outstanding -= 1
            while self.held and self.in_flight < self.limit:
                item = self.held.popleft()
                if item[0].set_running_or_notify_cancel():
                    self.in_flight += 1
                    batch.append(item)
                else:  # cancelled while held
                    self.outstanding -= 1
            release = self.shutdown and self.outstanding == 0
            if self.outstanding == 0:
                self.idle.notify_all()
        for item in batch:
            self._send(*item)
        if release:
            self._release()

    # -- done-callbacks --

    def defer_callbacks(self, future):
        """Queue ``future``'s done-callbacks for the callback thread (started when there are
        callbacks to run; it leaves when there have been none for a while)."""
        with self.lock:
            self.callbacks.append(future)
            self.callbacks_pending += 1
            if self.callback_thread is not None:
                self.idle.notify_all()
                return
            thread = self.callback_thread = threading.Thread(
                target=self._callback_loop, name="pyparallel-executor-callbacks", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no new threads at interpreter shutdown: run them here
            with self.lock:
                self.callback_thread = None
            self._callback_loop(linger=0)

    def _callback_loop(self, linger=CALLBACK_LINGER):
        me = threading.current_thread()
        while True:
            with self.lock:
                if not self.callbacks and linger:
                    self.idle.wait(linger)
                if not self.callbacks:
                    if self.callback_thread is me:
                        self.callback_thread = None
                    return
                future = self.callbacks.popleft()
            try:
                _run_callbacks(future)
            finally:
                with self.lock:
                    self.callbacks_pending -= 1
                    if self.callbacks_pending == 0:
                        self.idle.notify_all()

    def on_callback_thread(self):
        return self.callback_thread is threading.current_thread()

    # -- shutdown --

    def cancel_held(self):
        with self.lock:
            held, self.held = list(self.held), collections.deque()
            self.outstanding -= len(held)
            if self.outstanding == 0:
                self.idle.notify_all()
        for item in held:
            item[0]._pp_cancel()

    def begin_shutdown(self, cancel_futures):
        with self.lock:
            self.shutdown = True
        if cancel_futures:
            self.cancel_held()
        with self.lock:
            release = self.outstanding == 0
        if release:
            self._release()

    def wait_idle(self):
        """Until every call submitted has completed and its future's callbacks have run (as
        the stdlib's shutdown joins the thread running them)."""
        with self.lock:
            while self.outstanding or self.callbacks_pending:
                self.idle.wait(0.5)

    def _release(self):
        """Shut down and idle: let go of the shared pool, or close our own (its workers
        leave; shutdown(wait=True) joins them)."""
        with self.lock:
            if self.released:
                return
            self.released = True
        if self.lease is not None:
            self.lease.release()
        else:
            self.pool.close()


_exiting = False
_cores = weakref.WeakSet()  # this process's executors (a forked child starts with none)


def _forget_cores():
    # A forked child (a pool worker, say) must not wait at its exit for its parent's
    # executors, whose copies it inherited with their counters frozen; their callback
    # threads are not in the child.
    global _cores
    for core in list(_cores):
        core.callback_thread = None
    _cores = weakref.WeakSet()


os.register_at_fork(after_in_child=_forget_cores)


def _at_exit():
    """As the stdlib's executors do at interpreter exit: later submits are refused and the
    calls already submitted complete."""
    global _exiting
    _exiting = True
    for core in list(_cores):
        try:
            core.wait_idle()
        except BaseException:  # pragma: no cover - Ctrl-C at exit
            pass


try:  # before atexit handlers (the pool's own would terminate the workers), as the stdlib
    from threading import _register_atexit

    _register_atexit(_at_exit)
except (ImportError, RuntimeError):  # pragma: no cover
    import atexit

    atexit.register(_at_exit)


# ---- the executor ----------------------------------------------------------------------------


class ProcessPoolExecutor(_base.Executor):
    """``concurrent.futures.ProcessPoolExecutor`` on pyparallel's workers; see the module
    docstring for where it differs (a dead worker fails one future; warm workers)."""

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *,
                 max_tasks_per_child=None, reuse=True):
        if max_workers is None:
            max_workers = cpu_count()
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            elif max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
            if mp_context is not None and _start_method(mp_context) == "fork":
                raise ValueError("max_tasks_per_child is incompatible with"
                                 " the 'fork' multiprocessing start method;"
                                 " supply a different mp_context.")
        self._max_workers = max_workers
        self._mp_context = mp_context
        args = (max_workers, initializer, tuple(initargs), max_tasks_per_child, mp_context)
        if reuse:
            lease = _reuse.lease(*args)
            pool = lease.pool
        else:
            lease = None
            pool = Pool(*args)
        self._core = core = _Core(pool, lease, max_workers)
        _cores.add(core)
        # Dropped without shutdown: stop taking calls, let go of the pool once they are done.
        self._finalizer = weakref.finalize(self, core.begin_shutdown, False)

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        self._core.submit(future, _Call(fn), args, kwargs, True)
        return future

    submit.__doc__ = _base.Executor.submit.__doc__

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None):
        """Returns an iterator equivalent to ``map(fn, *iterables)``, computed in the workers.

        ``timeout``: seconds for the whole iteration (TimeoutError after that);
        ``chunksize``: items per task, as in the stdlib (the default 1 batches automatically,
        keeping per-item results and errors); ``buffersize``: at most this many tasks
        submitted ahead of the one being consumed (Python 3.14's argument), so that an
        endless iterable can be mapped.
        """
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if timeout is not None:
            end_time = timeout + time.monotonic()
        star = len(iterables) != 1
        source = zip(*iterables) if star else iter(iterables[0])
        per_item = chunksize == 1
        if buffersize is None:
            items = list(source)
            if per_item:
                chunksize = max(1, min(MAX_BATCH,
                                       len(items) // (TASKS_PER_WORKER * self._max_workers)))
            source = iter(items)
        chunks = _batched(source, chunksize)
        call = _Batch(fn, per_item, star)
        core = self._core

        def submit_chunk(chunk):
            future = Future()
            core.submit(future, call, (chunk,), {}, False)
            return future

        if buffersize is None:
            fs = collections.deque(submit_chunk(c) for c in chunks)
        else:
            fs = collections.deque(submit_chunk(c) for c in itertools.islice(chunks, buffersize))
        fs.reverse()  # popped from the end, in order
        executor_ref = weakref.ref(self)

        def result_iterator():
            try:
                while fs:
                    # As Python 3.14: the next task goes in before this one is waited for.
                    if buffersize is not None and executor_ref() is not None:
                        nxt = next(chunks, None)
                        if nxt is not None:
                            fs.appendleft(submit_chunk(nxt))
                    fut = fs.pop()
                    try:
                        try:
                            value = fut.result(None if timeout is None
                                               else end_time - time.monotonic())
                        finally:
                            fut.cancel()
                    finally:
                        del fut
                    if type(value) is _Failed:
                        values, exc = value.values, value.exc
                        value = None
                        yield from values
                        raise _remote_cause(exc)
                    yield from value
                    value = None
            finally:
                for future in fs:
                    future.cancel()

        return result_iterator()

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop taking calls. ``cancel_futures``: cancel the calls not yet handed to a worker.
        ``wait``: return once every call submitted has completed (and, with ``reuse=False``,
        the workers have exited)."""
        core = self._core
        self._finalizer.detach()
        core.begin_shutdown(cancel_futures)
        if wait:
            if core.on_callback_thread():
                # A done-callback waiting for every callback to have run: the stdlib joins
                # its own manager thread here and raises the same.
                raise RuntimeError("cannot join current thread")
            core.wait_idle()
            if core.lease is None:
                core.pool.close()
                core.pool.join()

    shutdown.__doc__ = shutdown.__doc__

    def terminate_workers(self):
        """Python 3.14's: ``shutdown(wait=False, cancel_futures=True)``, then SIGTERM to the
        workers running this executor's calls (SIGKILL to one still there after a moment).
        The futures of the calls they were running fail with :class:`BrokenWorkerError`,
        those handed to the pool but not started with ``BrokenProcessPool``, the held ones
        are cancelled; later submits raise RuntimeError. With ``reuse=False`` the idle
        workers stop too; on the shared pool only this executor's calls are touched (the
        stopped workers are replaced for the others)."""
        self._stop_workers("terminate")

    def kill_workers(self):
        """As :meth:`terminate_workers`, with SIGKILL."""
        self._stop_workers("kill")

    def _stop_workers(self, stop):
        core = self._core
        self.shutdown(wait=False, cancel_futures=True)
        how = f"{stop}_workers()"

        def error(exits):
            if exits:
                return WorkerLostError("; ".join(describe_exit(pid, code) for pid, code in exits)
                                       + f" by {how} while running this call")
            return BrokenProcessPool(f"the executor's workers were stopped by {how} before "
                                     "this call started")

        results = [f._pp_async for f in list(core.sent) if not f.done()]
        results = [r for r in results if r is not None]
        if results:
            core.pool._backend.cancel_all(results, error, stop)
        if core.lease is None:
            core.pool.terminate()


def _start_method(ctx):
    if isinstance(ctx, str):
        return ctx
    return ctx.get_start_method(allow_none=False)


def _batched(iterable, n):
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk
