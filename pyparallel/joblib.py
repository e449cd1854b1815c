"""A joblib backend on pyparallel's workers.

Importing this module registers the backend ``"pyparallel"`` with joblib::

    import joblib, pyparallel.joblib
    with joblib.parallel_config(backend="pyparallel"):
        joblib.Parallel(n_jobs=4)(joblib.delayed(f)(x) for x in xs)

and scikit-learn's ``n_jobs=`` then runs on the same workers. ``register(name=...)`` does it
explicitly (in a child interpreter, say, or under another name).

It implements joblib's backend API as joblib 1.4 to 1.6 call it: ``submit`` with a completion
callback (``apply_async`` for 1.4), ``retrieve_result_callback``, ``configure``,
``effective_n_jobs`` (``n_jobs=-1`` is every usable CPU), ``terminate``, ``abort_everything``,
joblib's automatic batching, ``return_as="generator"``/``"generator_unordered"`` and
``timeout=``; nested ``Parallel`` calls inside a task use threads, then run sequentially, as
under joblib's own process backends. Tasks (joblib's ``BatchedCalls``) travel with
cloudpickle, so functions defined in ``__main__`` or a notebook cell after the workers
started work. The workers get joblib's oversubscription guard: ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` ... set to ``cpu_count() // n_jobs`` unless set
in the parent (or ``inner_max_num_threads`` when given), and the thread pools of native
libraries a forked worker inherited already loaded are limited through threadpoolctl when it
is installed.

Workers are reused: successive ``Parallel`` calls with the same ``n_jobs`` (and initializer)
run on the process's warm pool (:func:`pyparallel.get_reusable_pool`), as loky's reusable
executor does. A worker that dies fails its batch with
:class:`pyparallel.futures.BrokenWorkerError` (a ``BrokenProcessPool``, like loky's
``TerminatedWorkerError``); an error or a timeout aborts the call and terminates the workers,
which the next call replaces. Differences from loky: large numpy arrays travel through
pyparallel's shared segments (copied once), not as memory-mapped files, so ``max_nbytes``,
``mmap_mode`` and ``temp_folder`` are accepted and ignored; ``idle_worker_timeout`` is
ignored (the warm pool lives until exit or until replaced).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import warnings

try:
    import joblib as _joblib
    from joblib._parallel_backends import (
        AutoBatchingMixin,
        FallbackToBackend,
        ParallelBackendBase,
        SequentialBackend,
    )
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "pyparallel.joblib needs joblib: pip install pyparallel[joblib]") from e

import cloudpickle
from concurrent.futures.process import _ExceptionWithTraceback

from . import _reuse
from ._cpu import cpu_count
from .futures import Future, _Core
from .pool import Pool

__all__ = ["PyParallelBackend", "register"]

_MIN_JOBLIB = (1, 4)


def _version(v):
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


if _version(_joblib.__version__) < _MIN_JOBLIB:  # pragma: no cover
    raise ImportError(f"pyparallel.joblib needs joblib >= 1.4 (found {_joblib.__version__}): "
                      "pip install pyparallel[joblib]")

_THREAD_VARS = getattr(ParallelBackendBase, "MAX_NUM_THREADS_VARS", [
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS",
])


# ---- what runs in the worker --------------------------------------------------------------


def _load(data):
    return cloudpickle.loads(data)


class _Task:
    """One joblib batch. Pickled with cloudpickle (functions from ``__main__`` travel by
    value); in the worker it returns (True, results) or (False, the exception with its
    traceback), BaseException included, as joblib's own wrapper does."""

    __slots__ = ("batch",)

    def __init__(self, batch):
        self.batch = batch

    def __reduce__(self):
        return _Task._rebuild, (cloudpickle.dumps(self.batch),)

    @staticmethod
    def _rebuild(data):
        return _Task(cloudpickle.loads(data))

    def __call__(self):
        try:
            return (True, self.batch())
        except BaseException as e:
            return (False, _ExceptionWithTraceback(e, e.__traceback__))


def _init_worker(env, initializer, initargs):
    """joblib's oversubscription guard, then the user's initializer."""
    os.environ.update(env)
    n = env.get("OMP_NUM_THREADS")
    if n is not None and any(m in sys.modules for m in ("numpy", "scipy", "threadpoolctl")):
        # A forked worker inherited native thread pools already started: the variables came
        # too late for them.
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            threadpool_limits(limits=int(n))
    if initializer is not None:
        initializer(*initargs)


# ---- the backend ----------------------------------------------------------------------------


class PyParallelBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ParallelBackendBase on a pyparallel pool (warm and shared by default:
    ``reuse=False`` gives each configured backend its own workers)."""

    supports_retrieve_callback = True
    supports_return_generator = True
    supports_timeout = True
    supports_inner_max_num_threads = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(self, nesting_level=None, inner_max_num_threads=None, reuse=True,
                 **backend_kwargs):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads)
        self.backend_kwargs = backend_kwargs
        self.reuse = reuse
        self._pool = None
        self._lease = None
        self._core = None
        self.parallel = None

    # -- sizing --

    def effective_n_jobs(self, n_jobs):
        """As joblib's process backends: -1 is every usable CPU, -2 all but one ...; 1 inside
        a daemonic process or below threads (with a warning)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if multiprocessing.current_process().daemon:
            if n_jobs != 1:
                warnings.warn("pyparallel-backed parallel loops cannot be called in a "
                              "daemonic process (a pool worker), setting n_jobs=1",
                              stacklevel=3)
            return 1
        if not (self.in_main_thread() or self.nesting_level == 0):
            if n_jobs != 1:
                warnings.warn("pyparallel-backed parallel loops cannot be nested below "
                              "threads, setting n_jobs=1", stacklevel=3)
            return 1
        if n_jobs < 0:
            n_jobs = max(cpu_count() + 1 + n_jobs, 1)
        return int(n_jobs)

    def _worker_env(self, n_jobs):
        explicit = self.inner_max_num_threads
        default = max(cpu_count() // n_jobs, 1)
        env = {}
        for var in _THREAD_VARS:
            env[var] = str(explicit if explicit is not None else os.environ.get(var, default))
        if "ENABLE_IPC" not in os.environ:
            env["ENABLE_IPC"] = "1"  # TBB schedulers of different workers coordinate
        return env

    # -- life cycle --

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, **kwargs):
        """Lease the warm pool of n_jobs workers (start it if needed); the number of
        workers, or FallbackToBackend(SequentialBackend) for one."""
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        kw = {**self.backend_kwargs, **kwargs}
        initializer = kw.pop("initializer", None)
        initargs = tuple(kw.pop("initargs", ()))
        maxtasksperchild = kw.pop("maxtasksperchild", None)
        context = kw.pop("context", None)
        if context is multiprocessing.get_context():
            context = None  # joblib always passes the stdlib's default: keep pyparallel's rule
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        # max_nbytes, mmap_mode, temp_folder, verbose, idle_worker_timeout: see the module
        # docstring; anything else is a mistake.
        for name in ("max_nbytes", "mmap_mode", "temp_folder", "verbose",
                     "idle_worker_timeout"):
            kw.pop(name, None)
        if kw:
            raise TypeError(f"unexpected arguments for the pyparallel backend: {sorted(kw)}")
        args = (n_jobs, _init_worker, (self._worker_env(n_jobs), initializer, initargs),
                maxtasksperchild, context)
        self._let_go()
        if self.reuse:
            self._lease = _reuse.lease(*args)
            self._pool = self._lease.pool
        else:
            self._pool = Pool(*args)
        # One batch per worker at a time: the pool queues a second one in a worker's ring,
        # where it would wait behind a long batch while another worker is free.
        self._core = _Core(self._pool, None, n_jobs, per_worker=1)
        self.parallel = parallel
        self._n_jobs = n_jobs
        return n_jobs

    def _let_go(self, kill=False):
        pool, lease = self._pool, self._lease
        self._pool = self._lease = self._core = None
        if pool is None:
            return
        if lease is None:
            pool.terminate()
            return
        if kill and lease.sole():
            pool.terminate()  # nobody else uses it: stop what is running now
        lease.release()

    def terminate(self):
        """End of a Parallel call: the warm workers stay for the next one."""
        self._let_go()
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready=True):
        """An error or a timeout: stop the running tasks (the workers are killed and later
        replaced, unless another user shares the pool), and be ready again if asked."""
        self._let_go(kill=True)
        if ensure_ready:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel,
                           **self.parallel._backend_kwargs)

    # -- tasks --

    def submit(self, func, callback=None):
        """Run joblib's batch ``func`` in a worker; returns a Future, ``callback(future)``
        is called when it is done (as with loky)."""
        core = self._core
        if core is None:
            raise RuntimeError("the pyparallel backend is not configured")
        future = Future()
        if callback is not None:
            future.add_done_callback(callback)
        try:
            core.submit(future, _Task(func), (), {}, False)
        except Exception as e:  # the pool can take no more batches
            if not future.done():
                future.set_exception(e)
        return future

    def apply_async(self, func, callback=None):  # joblib 1.4
        return self.submit(func, callback)

    def retrieve_result_callback(self, future):
        """The batch's results, or its exception (with the worker's traceback as cause)."""
        ok, value = future.result()
        if ok:
            return value
        raise value


def register(name="pyparallel", make_default=False):
    """Register the backend with joblib under ``name`` (done on import as "pyparallel")."""
    _joblib.register_parallel_backend(name, PyParallelBackend, make_default=make_default)


register()
