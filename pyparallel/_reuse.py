"""One warm worker set per process, shared by whoever asks for the same kind of pool.

:func:`get_reusable_pool` is loky's ``get_reusable_executor`` for :class:`pyparallel.Pool`:
a notebook, or a library that makes a pool for every call, asks for one and gets the workers
that are already running instead of paying start-up again. There is one such pool per
process: asking with other arguments (processes, initializer, initargs, maxtasksperchild,
context) replaces it, and the old one is closed (what was already submitted to it still
completes) as soon as nobody holds it. ``close()`` or ``terminate()`` on it ends it; the next
call starts a fresh one. It is terminated at interpreter exit.

The executor (:mod:`pyparallel.futures`) and the joblib backend (:mod:`pyparallel.joblib`)
*lease* the shared pool (:func:`lease`): a leased pool is not closed under its holder when
somebody else asks for a different one; it is closed when its last holder lets go.

A child process (fork) never touches the pool it inherited: it belongs to the parent.
"""
from __future__ import annotations

import atexit
import os
import threading

from .pool import Pool

__all__ = ["get_reusable_pool"]


class _ReusablePool(Pool):
    """The shared pool. Leaving a ``with`` block leaves it running (it is meant to be
    reused); ``close()``/``terminate()`` do end it."""

    _reuse_ended = False

    def __exit__(self, *exc):
        return None

    def close(self):
        self._reuse_ended = True
        super().close()

    def terminate(self):
        self._reuse_ended = True
        super().terminate()


class _Entry:
    __slots__ = ("key", "pool", "leases", "retired")

    def __init__(self, key, pool):
        self.key = key
        self.pool = pool
        self.leases = 0
        self.retired = False


class _Registry:
    """The process's shared pool and the retired ones still leased. All state behind one
    lock; a pool is created with the lock held so that two callers never both start one."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current = None  # _Entry
        self.retired = []  # _Entry objects replaced while leased
        self.inherited = []  # entries of the parent process (fork): kept, never touched

    def after_fork_in_child(self):
        self.lock = threading.Lock()
        self.inherited.extend(e for e in [self.current, *self.retired] if e is not None)
        self.current = None
        self.retired = []

    def acquire(self, key, leased):
        with self.lock:
            cur = self.current
            if cur is None or cur.pool._reuse_ended or not _same_key(cur.key, key):
                # The new pool first: arguments it refuses leave the warm one in place.
                processes, initializer, initargs, maxtasksperchild, context = key
                pool = _ReusablePool(processes, initializer, initargs, maxtasksperchild,
                                     context)
                if cur is not None:
                    self._retire(cur)
                cur = self.current = _Entry(key, pool)
            if leased:
                cur.leases += 1
            return cur

    def _retire(self, entry):  # lock held
        entry.retired = True
        if entry.leases == 0:
            entry.pool.close()  # what was submitted still completes; the workers then leave
        else:
            self.retired.append(entry)

    def release(self, entry):
        with self.lock:
            entry.leases -= 1
            if entry.retired and entry.leases == 0:
                try:
                    self.retired.remove(entry)
                except ValueError:
                    pass
                entry.pool.close()

    def shutdown(self):
        """Interpreter exit: terminate every pool of this process."""
        with self.lock:
            entries = [e for e in [self.current, *self.retired] if e is not None]
            self.current = None
            self.retired = []
        for e in entries:
            try:
                e.pool.terminate()
                e.pool.join()
            except Exception:
                pass


def _same(a, b):
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if type(a) is tuple:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # e.g. numpy arrays: not comparable as one truth value
        return False


def _same_key(a, b):
    return all(_same(x, y) for x, y in zip(a, b))


def _key(processes, initializer, initargs, maxtasksperchild, context):
    """The arguments that decide whether the warm pool fits; checked as Pool checks them."""
    from ._cpu import cpu_count

    if processes is None:
        processes = cpu_count()
    if isinstance(context, str):
        import multiprocessing

        context = multiprocessing.get_context(context)  # an unknown name raises here
    return (processes, initializer, tuple(initargs), maxtasksperchild, context)


_registry = _Registry()
os.register_at_fork(after_in_child=_registry.after_fork_in_child)
atexit.register(_registry.shutdown)


def get_reusable_pool(processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                      context=None) -> Pool:
    """The process's warm :class:`pyparallel.Pool`, started on first use.

    A second call with the same arguments returns the same pool and its running workers;
    a call with other arguments replaces it (the old pool completes what it was given and
    its workers leave). ``with get_reusable_pool() as pool:`` leaves the pool running;
    ``pool.close()`` or ``pool.terminate()`` end it, and the next call starts a new one.
    The pool is terminated at interpreter exit.
    """
    return _registry.acquire(
        _key(processes, initializer, initargs, maxtasksperchild, context), False).pool


class Lease:
    """A hold on the shared pool: it is not closed under the holder until ``release()``."""

    __slots__ = ("pool", "_entry", "_released")

    def __init__(self, entry):
        self._entry = entry
        self.pool = entry.pool
        self._released = False

    def sole(self):
        """Whether this is the only lease on its pool."""
        return self._entry.leases == 1 and not self._released

    def release(self):
        if not self._released:
            self._released = True
            _registry.release(self._entry)


def lease(processes=None, initializer=None, initargs=(), maxtasksperchild=None,
          context=None) -> Lease:
    """Like get_reusable_pool, held until the returned Lease is released."""
    return Lease(_registry.acquire(
        _key(processes, initializer, initargs, maxtasksperchild, context), True))
