"""The result objects a pool returns: pyparallel's own, safe to complete from any thread.

They have the standard library's public behaviour: ``get(timeout)`` (raising
``multiprocessing.TimeoutError``), ``wait(timeout)``, ``ready()``, ``successful()`` (ValueError
when not ready), callbacks run once, before ``get()`` returns; imap iterators with
``next(timeout)``. ``isinstance(r, multiprocessing.pool.AsyncResult)`` holds: the classes
subclass the stdlib's public names, override every method and touch none of their fields.

A backend completes them through three methods, and nothing else:

- ``_set_chunk(start, count, success, value)``: the items ``start .. start+count-1`` of the
  call are done; ``value`` is, for a failure, the exception, else for an ApplyResult the
  result itself and for the others the list of the ``count`` results;
- ``_abort(err)``: fail the whole call now if it is not complete (terminate, cancel, a pool
  that cannot run tasks); returns False when it was already complete, which is not an error;
- ``_set_length(n)`` (imap only): the input had ``n`` items.

Completing the same items twice is a bug of the backend: it raises
:class:`ResultCompletedTwice` instead of being swallowed.

While it is pending, a result holds its ``backend`` (for ``help``: collecting the result in the
caller's thread before blocking; for ``cancel``: Ctrl-C in ``get()``/``next()`` cancels the call
and leaves the pool running). Callbacks run in the thread that completes the result; an
exception in one is printed and does not reach the backend.
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing.pool as _mpp
import sys
import threading
import traceback
from _thread import allocate_lock as _allocate_lock
from time import monotonic as _monotonic

from .errors import TimeoutError

__all__ = ["ApplyResult", "AsyncResult", "MapResult", "IMapIterator", "IMapUnorderedIterator",
           "ResultCompletedTwice"]

_job_counter = itertools.count()


class ResultCompletedTwice(RuntimeError):
    """A backend completed the same part of a result twice (a bug in the backend)."""


def _run_callback(cb, value):
    try:
        cb(value)
    except BaseException:  # noqa: BLE001 - a callback must not take the completer down
        print(f"Exception in pyparallel pool callback {cb!r}:", file=sys.stderr)
        traceback.print_exc()


class _Flag:
    """threading.Event's is_set/set/wait on one lock: a tenth of the cost to create, and a
    result is created per apply_async. ``set`` is called once, under the result's lock."""

    __slots__ = ("_lock", "_flag")

    def __init__(self):
        self._flag = False
        self._lock = _allocate_lock()
        self._lock.acquire()

    def is_set(self):
        return self._flag

    def set(self):
        self._flag = True
        self._lock.release()

    def wait(self, timeout=None):
        if self._flag:
            return True
        if self._lock.acquire(True, -1 if timeout is None else max(timeout, 0)):
            self._lock.release()  # let the next waiter through
        return self._flag


class ApplyResult(_mpp.ApplyResult):
    """The result of ``apply_async``."""

    def __init__(self, cache, callback=None, error_callback=None, backend=None):
        # not the stdlib's __init__: nothing of its fields is used
        self._event = _Flag()
        self._lock = _allocate_lock()
        self._job = next(_job_counter)
        self._cache = cache
        self._callback = callback
        self._error_callback = error_callback
        self._backend = backend
        self._success = None
        self._value = None
        self._final = False  # completed (value and success are final)
        cache[self._job] = self

    def __repr__(self):
        state = "ready" if self._final else "pending"
        return f"<{type(self).__name__} job={self._job} {state}>"

    # -- the public API --

    def ready(self):
        return self._event.is_set()

    def successful(self):
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout=None):
        try:
            self._wait(timeout)
        except KeyboardInterrupt:
            self._interrupted()
            raise

    def _wait(self, timeout=None):
        """``wait`` without cancelling the call on Ctrl-C (an executor's future: an
        interrupted wait leaves the call running, as in the stdlib)."""
        if not self._event.is_set():
            backend = self._backend
            if backend is not None:
                backend.help(self)
            self._event.wait(timeout)

    def get(self, timeout=None):
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    # -- completion (backends) --

    def _set_chunk(self, start, count, success, value):
        with self._lock:
            if self._final:
                if self._aborted:
                    return False
                raise ResultCompletedTwice(f"{self!r} completed twice")
            self._final = True
            self._aborted = False
            self._success = success
            self._value = value
        self._finish()
        return True

    _aborted = False
    _progress = None  # see .progress: advanced as chunks finish

    def _set(self, i, obj):
        """multiprocessing's (success, value) form, for one whole result."""
        return self._set_chunk(0, 1, obj[0], obj[1])

    def _abort(self, err):
        with self._lock:
            if self._final:
                return False
            self._final = True
            self._aborted = True
            self._success = False
            self._value = err
        self._finish()
        return True

    def _finish(self):
        if self._progress is not None:
            self._progress.close()
        cb = self._callback if self._success else self._error_callback
        if cb is not None:
            _run_callback(cb, self._value)
        self._event.set()
        self._cache.pop(self._job, None)
        self._backend = None

    def _interrupted(self):
        backend = self._backend
        if backend is not None:
            backend.cancel(self)


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async``/``starmap_async``: a list of ``length`` results, completed
    chunk by chunk. Like the stdlib's: ready once every chunk is done; a failure makes it fail
    with the first exception."""

    def __init__(self, cache, length, callback=None, error_callback=None, backend=None):
        super().__init__(cache, callback, error_callback, backend)
        self._value = [None] * length
        self._success = True
        self._left = length
        self._starts = set()
        if length == 0:  # as in the stdlib: ready at once, and no callback
            self._final = True
            self._event.set()
            cache.pop(self._job, None)
            self._backend = None

    def _set_chunk(self, start, count, success, value):
        with self._lock:
            if start in self._starts:
                raise ResultCompletedTwice(f"{self!r}: items from {start} completed twice")
            if self._final:
                if self._aborted:
                    return False
                raise ResultCompletedTwice(f"{self!r} completed twice")
            self._starts.add(start)
            if success and self._success:
                self._value[start:start + count] = value
            elif not success and self._success:
                self._success = False
                self._value = value  # the first exception
            self._left -= count
            left = self._left
            if left <= 0:
                self._final = True
                self._starts = None
        if self._progress is not None:
            self._progress.update(count)
        if left <= 0:
            self._finish()
        return True

    def _set(self, i, obj):
        """The whole list at once (the kernels' path)."""
        return self._set_chunk(0, len(self._value) if obj[0] else self._left, obj[0], obj[1])


class _Stop:
    """Marks the end of a chunked imap after a failure (the stdlib's generator ends there)."""


class IMapIterator(_mpp.IMapIterator):
    """The iterator ``imap`` returns: results in input order, ``next(timeout)`` as in
    multiprocessing.

    For a backend it is also the throttle of a lazy call: ``_issued`` (items handed to
    workers) against ``_taken`` (items the caller took); when the caller falls behind, the
    backend sets ``_waker`` and stops feeding, and the next ``next()`` calls it."""

    _ordered = True

    def __init__(self, cache, backend=None, chunked=False):
        self._cond = threading.Condition(threading.Lock())
        self._job = next(_job_counter)
        self._cache = cache
        self._backend = backend
        self._items = collections.deque()
        self._unsorted = {}
        self._index = 0  # items moved to _items (ordered) or arrived (unordered)
        self._length = None
        self._starts = set()
        self._chunked = chunked  # chunksize > 1: a failure ends the iteration, as in the stdlib
        self._issued = 0
        self._taken = 0
        self._waker = None
        self._aborted = False
        self._progress = None
        cache[self._job] = self

    def __iter__(self):
        return self

    def __repr__(self):
        return f"<{type(self).__name__} job={self._job} taken={self._taken}>"

    def next(self, timeout=None):
        try:
            return self._next(timeout)
        except KeyboardInterrupt:
            self._interrupted()
            raise

    __next__ = next

    def _next(self, timeout):
        cond = self._cond
        with cond:
            if not self._items and self._index != self._length:
                backend = self._backend
                if backend is not None:
                    cond.release()
                    try:
                        backend.help(self)
                    finally:
                        cond.acquire()
            if not self._items:
                if self._index == self._length:
                    self._backend = None
                    raise StopIteration from None
                if timeout is None:
                    while not self._items and self._index != self._length:
                        cond.wait()
                else:
                    end = _monotonic() + timeout
                    while not self._items and self._index != self._length:
                        left = end - _monotonic()
                        if left <= 0 or not cond.wait(left):
                            if not self._items and self._index != self._length:
                                raise TimeoutError
                if not self._items:
                    self._backend = None
                    raise StopIteration from None
            success, value = self._items.popleft()
            if value is _Stop:
                self._items.clear()
                self._index = self._length = 0
                self._backend = None
                raise StopIteration
            if not success and self._chunked:
                self._items.clear()
                self._items.append((True, _Stop))
        self._took()
        if success:
            return value
        raise value

    def _took(self):
        self._taken += 1
        waker = self._waker
        if waker is not None:
            self._waker = None
            waker()

    def _interrupted(self):
        backend = self._backend
        if backend is not None:
            backend.cancel(self)

    # -- completion (backends) --

    def _set_chunk(self, start, count, success, value):
        with self._cond:
            if start in self._starts:
                raise ResultCompletedTwice(f"{self!r}: items from {start} completed twice")
            if self._aborted:
                return False
            self._starts.add(start)
            self._put(start, count, success, value)
            self._cond.notify()
            if self._progress is not None:
                self._progress.update(count)
            if self._index == self._length:
                self._done()
        return True

    def _put(self, start, count, success, value):
        if success:
            for k, v in enumerate(value):
                self._unsorted[start + k] = (True, v)
        else:
            self._unsorted[start] = (False, value)
            for k in range(1, count):
                self._unsorted[start + k] = None  # skipped: the chunk failed as a whole
        while self._index in self._unsorted:
            item = self._unsorted.pop(self._index)
            if item is not None:
                self._items.append(item)
            self._index += 1

    def _done(self):
        self._cache.pop(self._job, None)
        self._starts = set()
        if self._progress is not None:
            self._progress.close()

    def _set_length(self, length):
        with self._cond:
            if self._aborted:
                return
            self._length = length
            if self._index == length:
                self._cond.notify()
                self._done()

    def _abort(self, err):
        with self._cond:
            if self._aborted or (self._length is not None and self._index == self._length):
                return False
            self._aborted = True
            self._unsorted.clear()
            self._items.append((False, err))
            self._index += 1
            self._length = self._index
            if self._chunked:
                self._items.append((True, _Stop))
            self._cond.notify_all()
            self._done()
        return True

    def _set(self, i, obj):  # pragma: no cover - the stdlib's form, unused by pyparallel
        raise NotImplementedError("use _set_chunk")


class IMapUnorderedIterator(IMapIterator):
    """The iterator ``imap_unordered`` returns: results in completion order."""

    _ordered = False

    def _put(self, start, count, success, value):
        if success:
            self._items.extend((True, v) for v in value)
        else:
            self._items.append((False, value))
        self._index += count
