"""Pool and ThreadPool: drop-in replacements for :mod:`multiprocessing.pool`.

``pyparallel.Pool`` has the whole ``multiprocessing.Pool`` API and semantics (map, imap,
imap_unordered, starmap, apply and the ``_async`` forms with callbacks, close/join/terminate,
the context manager, initializer/initargs, maxtasksperchild, the stdlib's default chunksize,
its exception classes, ``pool._pool``). This module checks arguments, cuts the input into
chunks, runs native kernels itself and hands the rest to a backend
(:mod:`pyparallel._pool.backend`); the local one moves the tasks through shared memory::

    caller thread                      shared memory (memfd)               worker i
    -------------                      ---------------------               --------
    map(f, xs): chunk, pickle (p5) --> task ring i  (SPSC bytes, futex) --> recv, unpickle,
                 writes while it fits  (f itself: once per worker)          run f(chunk)
                 big buffers -------> spill segment (reused) ------------> mapped, viewed
    AsyncResult.get() <-- collector <-- result ring i (SPSC bytes) <------- pickle, send
                          thread: poll(wake pipe + worker pidfds),
                          completes results, feeds the next chunks, replaces dead workers

There is no task-handler thread: the caller writes tasks into the rings itself, a few chunks
ahead per worker; the rest is fed by the collector as results come back, so ``imap`` over an
endless generator holds a bounded window in memory. Lists of plain numbers travel packed;
big buffers (numpy arrays, bytes) are copied once, into shared segments the workers map. See
:mod:`pyparallel._pool.local.engine` for the details.

**Start method**: ``context=None`` is multiprocessing's own default (fork on Linux up to
Python 3.13, forkserver from 3.14, or what ``multiprocessing.set_start_method`` chose), on
every run; ``pool.start_method`` tells it. A script needs no ``if __name__ == "__main__":``
guard: workers never re-run the main script; functions and classes of ``__main__`` (and
lambdas, closures, notebook functions) travel by value, with their globals resolved in the
worker's own ``__main__`` (see :mod:`pyparallel._serialize`), so an initializer's globals are
seen by the tasks under every start method and a big global is not sent with every task.

What it adds over multiprocessing:

- **Nothing hangs.** A worker killed mid-task (SIGKILL, segfault, ``os._exit``) fails the
  task it was running with :class:`WorkerLostError` (naming the pid and the signal or exit
  code); the tasks queued behind it are resent, a new worker takes the slot, the map goes on.
  An initializer that raises or kills its worker fails the calls with
  :class:`InitializerError` instead of respawning workers forever. ``terminate()`` fails
  whatever is still pending with :class:`PoolTerminatedError`. A task that raises
  ``SystemExit`` or ``KeyboardInterrupt`` fails with that exception; a result that cannot be
  pickled fails with ``MaybeEncodingError``; an exception in a callback is printed.
- **Ctrl-C** in ``map``/``imap``/``apply``/``get()`` cancels that call (its result fails with
  :class:`TaskCancelledError`, the workers running it are replaced) and raises
  KeyboardInterrupt; the pool stays usable (a ``with`` block still terminates it on exit).
- **Bad input** raises before anything runs: an unpicklable argument for ``map``,
  ``starmap``, ``apply`` and their ``_async`` forms (``imap`` fails the item, like the stdlib),
  a chunksize below 1.
- **Native kernels** (``pyparallel.kernels.fib`` ...) given to ``map``/``imap``/``apply``
  run in-process on ``processes`` threads through their bulk path: no pickling, no processes.
"""
from __future__ import annotations

import importlib
import itertools
import multiprocessing.pool as _mpp
import threading
import warnings

from . import _core, _tunables
from ._cpu import cpu_count
from ._pool import context as _context
from ._pool.backend import APPLY, BULK, MAP, STARMAP, Chunk, Job, State, chunk_source
from ._pool import progress as _progress
from ._pool.errors import (InitializerError, MaybeEncodingError, PoolTerminatedError,
                           RemoteTraceback, TaskCancelledError, TaskTimeoutError, TimeoutError,
                           WorkerLostError)
from ._pool.identity import WorkerInfo, current_worker
from ._pool.results import (ApplyResult, AsyncResult, IMapIterator, IMapUnorderedIterator,
                            MapResult)

__all__ = [
    "Pool",
    "ThreadPool",
    "AsyncResult",
    "ApplyResult",
    "MapResult",
    "IMapIterator",
    "IMapUnorderedIterator",
    "WorkerLostError",
    "InitializerError",
    "PoolTerminatedError",
    "TaskCancelledError",
    "TaskTimeoutError",
    "TimeoutError",
    "WorkerInfo",
    "current_worker",
    "RemoteTraceback",
    "MaybeEncodingError",
    "default_start_method",
]

RUN, CLOSE, TERMINATE = State.RUN, State.CLOSE, State.TERMINATE

#: backend name -> "module:class"; the module is imported only when asked for
_BACKENDS = {
    "local": ("pyparallel._pool.local.engine", "LocalBackend", None),
    "dask": ("pyparallel._pool.dask", "DaskBackend", "dask"),
}


def default_start_method() -> str:
    """The start method ``Pool()`` uses: multiprocessing's default on this Python."""
    return _context.method_name(_context.resolve(None))


def _is_kernel(func, _Kernel=_core.Kernel):
    return type(func) is _Kernel and func.unary


class _KernelBulk:
    """A kernel's bulk path over one chunk, for a backend whose workers run kernels: one team
    per worker process, with that process's default threads."""

    __slots__ = ("kernel",)

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(self, items):
        return self.kernel.map(items)

    def __reduce__(self):
        return _KernelBulk, (self.kernel,)


def _check_chunksize(chunksize):
    if chunksize is None:
        return
    if not isinstance(chunksize, int) or isinstance(chunksize, bool):
        raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
    if chunksize < 1:
        raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))


def _check_callbacks(callback, error_callback):
    """TypeError at the call for a callback that cannot be called (multiprocessing takes it
    and fails later, in its result thread)."""
    for name, cb in (("callback", callback), ("error_callback", error_callback)):
        if cb is not None and not callable(cb):
            raise TypeError(f"{name} must be callable or None, not {type(cb).__name__}")


def _check_timeout(task_timeout):
    if task_timeout is None:
        return None
    if isinstance(task_timeout, bool) or not isinstance(task_timeout, (int, float)):
        raise TypeError(f"task_timeout must be a number of seconds or None, not "
                        f"{type(task_timeout).__name__}")
    if not task_timeout > 0:
        raise ValueError(f"task_timeout must be positive, not {task_timeout!r}")
    return float(task_timeout)


def _length(iterable):
    try:
        return len(iterable)
    except TypeError:
        return None


def _load_backend(name):
    try:
        module, cls, extra = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown pool backend {name!r}; known: {', '.join(_BACKENDS)}") \
            from None
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if extra is None:
            raise
        raise ImportError(f"the {name} backend needs the {extra!r} extra: "
                          f"pip install 'pyparallel[{extra}]' ({e})") from e
    return getattr(mod, cls)


class Pool:
    """A process pool with the API of ``multiprocessing.Pool``; see the module docstring.

    ``backend``: "local" (the default: processes on this machine) or "dask" (a Dask
    distributed cluster; its options, such as ``address=`` or ``client=``, are passed on).
    ``task_timeout``: seconds a task may run before its worker is killed and replaced and the
    task fails with :class:`TaskTimeoutError` (each call may set its own)."""

    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                 context=None, *, backend=None, task_timeout=None, **options):
        self._backend = None  # a failed __init__ must not warn in __del__
        self._task_timeout = _check_timeout(task_timeout)
        self._cache = {}
        self._tokens = set()  # cancel tokens of the kernels this pool runs on its threads
        if processes is not None:
            if not isinstance(processes, int) or isinstance(processes, bool):
                raise TypeError(f"processes must be an int or None, not "
                                f"{type(processes).__name__}")
            if processes < 1:
                raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if backend is None:
            backend = "dask" if "client" in options or "address" in options else "local"
        if options and backend == "local":
            raise TypeError(f"unexpected keyword arguments for the local pool: "
                            f"{', '.join(options)}")
        factory = _load_backend(backend)
        if backend == "local":
            if processes is None:
                processes = cpu_count()
            self._ctx = _context.resolve(context)
            self._backend = factory(processes, self._ctx, initializer, initargs,
                                    maxtasksperchild, self._cache)
        else:
            self._ctx = None
            self._backend = factory(processes, initializer, initargs, maxtasksperchild,
                                    self._cache, **options)
        self._processes = self._backend.processes
        if self._task_timeout is not None and not getattr(self._backend,
                                                          "supports_task_timeout", False):
            self._backend.terminate()
            raise ValueError(f"the {backend} backend does not support task_timeout")

    # -- state --

    @property
    def _state(self):
        forced = self.__dict__.get("_forced_state")
        if forced is not None:
            return forced
        b = self._backend
        return None if b is None else b.lifecycle.state

    @_state.setter
    def _state(self, value):
        # multiprocessing's own tests force it (to see __del__ warn); the backend is unchanged
        self.__dict__["_forced_state"] = State(value)

    @property
    def start_method(self):
        """"fork", "forkserver" or "spawn" (None for a backend without one)."""
        return self._backend.start_method

    @property
    def _pool(self):
        """The worker processes (``pid``, ``is_alive()``, ``exitcode``), as multiprocessing's."""
        return self._backend.workers()

    def _repopulate_pool(self):
        self._backend.repopulate()

    def _check_running(self):
        if self._state is not RUN:
            raise ValueError("Pool not running")

    def __reduce__(self):
        raise NotImplementedError(
            "pool objects cannot be passed between processes or pickled")

    def __repr__(self):
        cls = self.__class__
        return (f"<{cls.__module__}.{cls.__qualname__} state={self._state} "
                f"pool_size={self._processes} start_method={self.start_method}>")

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, *exc):
        self.terminate()

    def __del__(self, _warn=warnings.warn, RUN=RUN):
        b = self._backend
        if b is not None and self._state is RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            b.terminate()

    def close(self):
        """No more tasks; workers leave once everything submitted is done."""
        self._backend.close()

    def terminate(self):
        """Stop the workers now; pending results fail with PoolTerminatedError."""
        if self._backend is not None:
            self._backend.terminate()  # pending results fail with PoolTerminatedError ...
            for token in list(self._tokens):  # ... then the kernels on our threads stop
                token.cancel()

    def join(self):
        """Wait for the workers to exit; call close() or terminate() first."""
        if self._state is RUN:
            raise ValueError("Pool is still running")
        elif self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._backend.join()

    # -- submission --

    def _timeout(self, task_timeout):
        t = self._task_timeout if task_timeout is None else _check_timeout(task_timeout)
        if t is not None and not getattr(self._backend, "supports_task_timeout", False):
            raise ValueError("this pool's backend does not support task_timeout")
        return t

    def _submit(self, job):
        try:
            self._backend.submit(job)
        except KeyboardInterrupt:
            # Ctrl-C while tasks were being written: cancel the call, keep the pool
            self._backend.cancel(job.result)
            raise
        except BaseException:
            self._cache.pop(job.result._job, None)
            raise

    def _map_async(self, func, iterable, kind, chunksize=None, callback=None, error_callback=None,
                   progress=None, task_timeout=None):
        self._check_running()
        _check_chunksize(chunksize)
        _check_callbacks(callback, error_callback)
        timeout = self._timeout(task_timeout)
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        n = len(iterable)
        sink = _progress.make(progress, n)
        if chunksize is None:
            chunksize, extra = divmod(n, self._processes * 4)
            if extra:
                chunksize += 1
            chunksize = max(chunksize, 1)
        if _is_kernel(func):
            if getattr(self._backend, "runs_kernels_in_process", False):
                return self._kernel_async(func, iterable, kind, n, callback, error_callback,
                                          timeout, sink)
            if kind == STARMAP:
                iterable = [a[0] if len(a) == 1 else _bad_star(func, a) for a in iterable]
            func, kind = _KernelBulk(func), BULK
        result = MapResult(self._cache, n, callback, error_callback, self._backend)
        result._chunksize = chunksize if n else 0  # as multiprocessing's MapResult has it
        if sink is not None:
            if n:
                result._progress = sink
            else:
                sink.close()
        if n:
            if isinstance(iterable, range):  # a range's chunks are ranges: 3 ints each
                chunks = [Chunk(i, min(chunksize, n - i), iterable[i:i + chunksize])
                          for i in range(0, n, chunksize)]
            elif (pack := getattr(self._backend, "pack_chunk", None)) is not None and type(
                    iterable) in (list, tuple):
                chunks = []
                for i in range(0, n, chunksize):
                    stop = min(i + chunksize, n)
                    chunks.append(Chunk(i, stop - i, pack(iterable, i, stop)))
            else:
                chunks = []
                it = iter(iterable)
                for i in range(0, n, chunksize):
                    batch = tuple(itertools.islice(it, chunksize))
                    chunks.append(Chunk(i, len(batch), batch))
            self._submit(Job(result, func, kind, chunks, timeout=timeout))
        return result

    def _kernel_async(self, func, iterable, kind, length, callback, error_callback, timeout=None,
                      sink=None):
        """A native kernel: its bulk path on `processes` threads, in this process."""
        items = list(iterable)
        if kind == STARMAP:
            items = [a[0] if len(a) == 1 else _bad_star(func, a) for a in items]
        result = MapResult(self._cache, length, callback, error_callback)
        if not length:
            if sink is not None:
                sink.close()
            return result
        result._progress = sink
        budget = None if timeout is None else timeout * length
        self._kernel_thread(result, lambda **kw: func.map(items, threads=self._processes, **kw),
                            budget)
        return result

    def _kernel_thread(self, result, call, budget=None):
        token = _core.CancelToken()
        tokens = self._tokens
        tokens.add(token)
        timer = None
        if budget is not None:  # the kernel stops at the deadline: a cancellation
            timer = threading.Timer(budget, token.cancel)
            timer.daemon = True
            timer.start()

        def run():
            try:
                obj = (True, call(cancel=token))
            except Exception as e:  # noqa: BLE001 - the call's failure
                if timer is not None and not timer.is_alive() and token.cancelled:
                    e = TaskTimeoutError(f"the kernel call ran longer than its task_timeout "
                                         f"({budget:g} s) and was stopped")
                obj = (False, e)
            finally:
                tokens.discard(token)
                if timer is not None:
                    timer.cancel()
            result._set(0, obj)

        threading.Thread(target=run, daemon=True, name="pyparallel-kernel").start()

    # -- the API --

    def apply(self, func, args=(), kwds={}, *, task_timeout=None):
        """``func(*args, **kwds)`` in a worker; blocks until the result is ready."""
        return self.apply_async(func, args, kwds, task_timeout=task_timeout).get()

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None, *,
                    task_timeout=None):
        """``func(*args, **kwds)`` in a worker: an AsyncResult."""
        self._check_running()
        _check_callbacks(callback, error_callback)
        timeout = self._timeout(task_timeout)
        if _is_kernel(func) and not kwds and getattr(self._backend, "runs_kernels_in_process",
                                                     False):
            result = ApplyResult(self._cache, callback, error_callback)
            args = tuple(args)
            self._kernel_thread(result, lambda **kw: func(*args, **kw), timeout)
            return result
        result = ApplyResult(self._cache, callback, error_callback, self._backend)
        self._submit(Job(result, func, APPLY, [Chunk(0, 1, (tuple(args), dict(kwds)))],
                         single=True, timeout=timeout))
        return result

    def map(self, func, iterable, chunksize=None, *, progress=None, task_timeout=None):
        """``list(map(func, iterable))`` computed in the workers, in chunks. ``progress``:
        True (a tqdm bar), a tqdm bar or a callable(done, total), advanced as tasks finish."""
        return self._map_async(func, iterable, MAP, chunksize, progress=progress,
                               task_timeout=task_timeout).get()

    def starmap(self, func, iterable, chunksize=None, *, progress=None, task_timeout=None):
        """Like map, with each item unpacked as arguments: ``func(*item)``."""
        return self._map_async(func, iterable, STARMAP, chunksize, progress=progress,
                               task_timeout=task_timeout).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None, *,
                  progress=None, task_timeout=None):
        """Like map, without waiting: a MapResult."""
        return self._map_async(func, iterable, MAP, chunksize, callback, error_callback,
                               progress, task_timeout)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None, *,
                      progress=None, task_timeout=None):
        """Like starmap, without waiting: a MapResult."""
        return self._map_async(func, iterable, STARMAP, chunksize, callback, error_callback,
                               progress, task_timeout)

    def _imap(self, cls, func, iterable, chunksize, progress, task_timeout):
        self._check_running()
        _check_chunksize(chunksize)
        timeout = self._timeout(task_timeout)
        if chunksize is None:
            chunksize = 1
        sink = _progress.make(progress, _length(iterable))
        kind = None
        if _is_kernel(func):
            if getattr(self._backend, "runs_kernels_in_process", False):
                return _kernel_imap(func, iterable, max(chunksize, 64 * self._processes),
                                    self._processes, sink)
            func, kind, chunksize = _KernelBulk(func), BULK, max(chunksize, 64)
        single = chunksize == 1
        result = cls(self._cache, self._backend, chunked=not single)
        result._progress = sink
        ahead = max(_tunables.IMAP_AHEAD_PER_WORKER * _tunables.WINDOW * self._processes,
                    _tunables.IMAP_AHEAD_MIN) * chunksize
        if kind is None:
            kind = APPLY if single else MAP
        job = Job(result, func, kind, chunk_source(iterable, chunksize, single),
                  lazy=True, single=single, ahead=ahead, timeout=timeout)
        self._submit(job)
        return result

    def imap(self, func, iterable, chunksize=1, *, progress=None, task_timeout=None):
        """Like map, lazily: results in order, inputs consumed as workers free up."""
        return self._imap(IMapIterator, func, iterable, chunksize, progress, task_timeout)

    def imap_unordered(self, func, iterable, chunksize=1, *, progress=None, task_timeout=None):
        """Like imap, results in completion order."""
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize, progress,
                          task_timeout)


def _bad_star(func, args):
    raise TypeError(f"{func!r} takes 1 argument ({len(args)} given)")


def _kernel_imap(func, iterable, batch, threads, sink=None):
    it = iter(iterable)
    try:
        while True:
            chunk = list(itertools.islice(it, batch))
            if not chunk:
                return
            out = func.map(chunk, threads=threads)
            if sink is not None:
                sink.update(len(chunk))
            yield from out
    finally:
        if sink is not None:
            sink.close()


# ---- ThreadPool -----------------------------------------------------------------------------


def _guard(cb):
    """A callback whose exception is printed instead of killing the pool's thread."""
    if cb is None:
        return None

    def guarded(value):
        try:
            cb(value)
        except BaseException:  # noqa: BLE001
            import sys
            import traceback

            print(f"Exception in pyparallel pool callback {cb!r}:", file=sys.stderr)
            traceback.print_exc()

    return guarded


class ThreadPool(_mpp.ThreadPool):
    """``multiprocessing.pool.ThreadPool`` with pyparallel's defaults: ``processes`` threads
    (default ``cpu_count()``), callbacks that cannot kill the pool, native kernels on their
    bulk path."""

    def __init__(self, processes=None, initializer=None, initargs=(), *, task_timeout=None):
        if task_timeout is not None:
            self._state = None  # what multiprocessing's __del__ looks at
            raise ValueError("ThreadPool cannot take task_timeout: a thread cannot be killed "
                             "(use pyparallel.Pool)")
        if processes is None:
            processes = cpu_count()
        super().__init__(processes, initializer, initargs)

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):
        _check_callbacks(callback, error_callback)
        return super().apply_async(func, args, kwds, _guard(callback), _guard(error_callback))

    def map(self, func, iterable, chunksize=None):
        if _is_kernel(func):
            self._check_running()
            return func.map(list(iterable), threads=self._processes)
        return super().map(func, iterable, chunksize)

    def _map_async(self, func, iterable, mapper, chunksize=None, callback=None,
                   error_callback=None):
        _check_callbacks(callback, error_callback)
        return super()._map_async(func, iterable, mapper, chunksize, _guard(callback),
                                  _guard(error_callback))
