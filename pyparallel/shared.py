"""Shared memory for processes: a drop-in for multiprocessing's ``Value``, ``Array``,
``RawValue``, ``RawArray`` and its locks, with atomics, zero-copy numpy and pickling by handle.

Drop-in names and behaviour (same constructors, same exceptions as multiprocessing)::

    from pyparallel import Value, Array, RawValue, RawArray
    from pyparallel import Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event, Barrier

    counter = Value('i', 0)            # synchronized wrapper, an RLock by default
    with counter.get_lock():
        counter.value += 1
    arr = Array('d', 1_000_000, lock=False)   # a plain ctypes array, like multiprocessing
    raw = RawArray('i', [1, 2, 3])

Beyond multiprocessing:

- **Atomics, lock-free**, on integer ``Value``s and ``Array`` elements: ``v.add(1)`` (returns
  the new value), ``v.fetch_add(d)``, ``v.sub``/``fetch_sub``, ``v.load()``, ``v.store(x)``,
  ``v.exchange(x)``, ``v.compare_exchange(expected, desired)`` (True when it swapped). Arrays
  take the index first: ``a.add(i, 1)``. They do not wrap: an ``add``/``sub`` whose result
  does not fit the typecode raises OverflowError and leaves the item unchanged.
  ``'d'``/``'f'`` items have ``load``/``store``/``exchange``. Raw objects have the same
  methods.
- **Zero-copy numpy**: ``numpy.asarray(arr)`` and ``memoryview(arr)`` view the shared data
  (for ``Array``, ``RawArray`` and ``Value``).
- **Pickling by handle, anywhere**: every object pickles as (pid, fd, inode, size, offset) of
  its segment, so it can be passed as an argument to ``multiprocessing.Process`` under any start
  method, to ``pyparallel.Pool`` or ``multiprocessing.Pool`` tasks (pickled explicitly or not),
  or through a queue; the receiver maps the *same* memory, nothing is copied. (multiprocessing
  refuses this with "Synchronized objects should only be shared between processes through
  inheritance".)
- **Robust locks**: when a process dies holding a ``Lock``/``RLock`` (or a ``Value``'s lock),
  the next acquirer takes it over within ~50 ms instead of deadlocking; ``lock.abandoned`` is
  then True for that acquire.

Waits release the GIL, honour timeouts and let Ctrl-C through.

Lifetime. Data lives in memfd segments: nothing appears in /dev/shm and no resource tracker is
needed. A segment is freed by the kernel when the last process using it lets go (drops its last
object in it, or exits). A receiver attaches through ``/proc/<sender pid>/fd/<fd>``, so **the
process that pickles a shared object must keep it alive until the receiver has unpickled it**
(for a Pool task: until the task has started, which holding the object across ``map`` does).
Small objects (values, locks) share 64 KiB arenas per process; large arrays get their own
segment. Each process holding a segment keeps one fd for it.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import weakref

from . import _core

__all__ = [
    "Value", "Array", "RawValue", "RawArray",
    "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event", "Barrier",
    "Synchronized", "SynchronizedArray", "SynchronizedString", "synchronized", "copy",
    "bank_account_demo",
]

typecode_to_type = {
    'c': ctypes.c_char, 'u': ctypes.c_wchar,
    'b': ctypes.c_byte, 'B': ctypes.c_ubyte,
    'h': ctypes.c_short, 'H': ctypes.c_ushort,
    'i': ctypes.c_int, 'I': ctypes.c_uint,
    'l': ctypes.c_long, 'L': ctypes.c_ulong,
    'q': ctypes.c_longlong, 'Q': ctypes.c_ulonglong,
    'f': ctypes.c_float, 'd': ctypes.c_double,
}

# ------------------------------------------------------------------------------------------
# Segments: allocation (arenas), handles and attachment

_ALIGN = 64                 # one cache line per object: no false sharing between locks
_ARENA_SIZE = 1 << 16
_BIG = _ARENA_SIZE // 4     # objects at least this big get a segment of their own


class _Arena:
    """Per-process bump allocator over small segments (reset in a forked child)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seg = None
        self.used = 0

    def alloc(self, nbytes):
        nbytes = max(nbytes, 1)
        if nbytes >= _BIG:
            return _core.Segment(nbytes), 0
        size = (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        with self.lock:
            if self.seg is None or self.used + size > _ARENA_SIZE:
                self.seg = _core.Segment(_ARENA_SIZE)
                self.used = 0
            off = self.used
            self.used += size
            return self.seg, off


_arena = _Arena()
_attached = weakref.WeakValueDictionary()   # inode -> Segment mapped in this process


def _after_fork_in_child():
    global _arena
    _arena = _Arena()   # the parent's arena is shared: never allocate from it again


os.register_at_fork(after_in_child=_after_fork_in_child)


def _alloc(nbytes):
    seg, off = _arena.alloc(nbytes)
    _attached[seg.ino] = seg
    return seg, off


def _seg_handle(seg):
    if seg.closed:
        raise ValueError("shared segment is closed")
    return (os.getpid(), seg.fd, seg.ino, seg.size)


def _attach(handle):
    pid, fd, ino, size = handle
    seg = _attached.get(ino)
    if seg is not None and not seg.closed:
        return seg
    seg = _core.Segment.attach(pid, fd, ino, size)
    _attached[ino] = seg
    return seg


# ------------------------------------------------------------------------------------------
# Raw ctypes objects in shared memory

_shared_types = {}


def _type_desc(t):
    """A picklable description of a ctypes type (array types are made on the fly)."""
    t = getattr(t, "_pp_base", t)
    if isinstance(t, type) and issubclass(t, ctypes.Array):
        return ("array", _type_desc(t._type_), t._length_)
    return ("type", t)


def _type_from_desc(desc):
    if desc[0] == "array":
        return _type_from_desc(desc[1]) * desc[2]
    return desc[1]


def _view_code(t):
    """(typecode, length, scalar) for the SharedView of a ctypes type."""
    if isinstance(t, type) and issubclass(t, ctypes.Array):
        code = getattr(t._type_, "_type_", None)
        if isinstance(code, str) and code in "bBhHiIlLqQfdc?" and \
                ctypes.sizeof(t._type_) == _code_size(code):
            return code, t._length_, False
        return "B", ctypes.sizeof(t), False
    code = getattr(t, "_type_", None)
    if isinstance(code, str) and code in "bBhHiIlLqQfdc?" and ctypes.sizeof(t) == _code_size(code):
        return code, 1, True
    return "B", ctypes.sizeof(t), False


def _code_size(code):
    return {"b": 1, "B": 1, "c": 1, "?": 1, "h": 2, "H": 2, "i": 4, "I": 4, "f": 4,
            "l": ctypes.sizeof(ctypes.c_long), "L": ctypes.sizeof(ctypes.c_long),
            "q": 8, "Q": 8, "d": 8}[code]


def _raw_view(obj):
    """The SharedView (atomics, buffer) of a raw shared ctypes object."""
    v = obj.__dict__.get("_pp_view")
    if v is None:
        seg, off = obj._pp_where
        code, length, scalar = _view_code(type(obj)._pp_base)
        v = _core.SharedView(seg, off, code, length, scalar)
        obj.__dict__["_pp_view"] = v
    return v


def _reduce_raw(self):
    seg, off = self._pp_where
    return (_rebuild_raw, (_type_desc(type(self)), _seg_handle(seg), off))


def _rebuild_raw(desc, handle, off):
    return _new_at(_type_from_desc(desc), _attach(handle), off)


def _atomic(name):
    def method(self, *args):
        return getattr(_raw_view(self), name)(*args)
    method.__name__ = name
    method.__doc__ = getattr(_core.SharedView, name).__doc__
    return method


_ATOMIC_NAMES = ("load", "store", "exchange", "fetch_add", "add", "fetch_sub", "sub",
                 "compare_exchange")


def _shared_type(t):
    """A subclass of ctypes type t that pickles by handle and has the atomic methods."""
    st = _shared_types.get(t)
    if st is None:
        ns = {"__reduce__": _reduce_raw, "_pp_base": t, "__module__": t.__module__}
        for name in _ATOMIC_NAMES:
            ns[name] = _atomic(name)
        if isinstance(getattr(t, "_type_", None), str) and not issubclass(t, ctypes.Array):
            ns["__repr__"] = lambda self: "%s(%r)" % (t.__name__, self.value)   # as ctypes
        st = type(t.__name__, (t,), ns)
        _shared_types[t] = st
    return st


def _new_at(type_, seg, off):
    obj = _shared_type(type_).from_buffer(seg, off)
    obj._pp_where = (seg, off)
    return obj


def _new_value(type_):
    size = ctypes.sizeof(type_)   # TypeError "this type has no size" for a bad typecode
    seg, off = _alloc(size)
    return _new_at(type_, seg, off)


def RawValue(typecode_or_type, *args):
    """A ctypes object allocated from shared memory (zero-filled, then ``__init__(*args)``)."""
    type_ = typecode_to_type.get(typecode_or_type, typecode_or_type)
    obj = _new_value(type_)
    if args:
        obj.__init__(*args)
    return obj


def RawArray(typecode_or_type, size_or_initializer):
    """A ctypes array allocated from shared memory."""
    type_ = typecode_to_type.get(typecode_or_type, typecode_or_type)
    if isinstance(size_or_initializer, int):
        type_ = type_ * size_or_initializer
        return _new_value(type_)
    else:
        type_ = type_ * len(size_or_initializer)
        result = _new_value(type_)
        result.__init__(*size_or_initializer)
        return result


def Value(typecode_or_type, *args, lock=True, ctx=None):
    """A ctypes object in shared memory, synchronized by a (robust, process-shared) lock."""
    obj = RawValue(typecode_or_type, *args)
    if lock is False:
        return obj
    if lock in (True, None):
        lock = RLock()
    if not hasattr(lock, "acquire"):
        raise AttributeError("%r has no method 'acquire'" % lock)
    return synchronized(obj, lock)


def Array(typecode_or_type, size_or_initializer, *, lock=True, ctx=None):
    """A ctypes array in shared memory, synchronized by a (robust, process-shared) lock."""
    obj = RawArray(typecode_or_type, size_or_initializer)
    if lock is False:
        return obj
    if lock in (True, None):
        lock = RLock()
    if not hasattr(lock, "acquire"):
        raise AttributeError("%r has no method 'acquire'" % lock)
    return synchronized(obj, lock)


def copy(obj):
    """A new shared object with the contents of ctypes object `obj` (as sharedctypes.copy)."""
    new_obj = _new_value(getattr(type(obj), "_pp_base", type(obj)))
    ctypes.pointer(new_obj)[0] = obj
    return new_obj


def synchronized(obj, lock=None, ctx=None):
    """Wraps a shared ctypes object with a lock (as multiprocessing.sharedctypes.synchronized)."""
    if lock is None:
        lock = RLock()
    base = getattr(type(obj), "_pp_base", None)
    if base is None:
        raise TypeError("synchronized() needs an object from pyparallel shared memory")
    if issubclass(base, ctypes.Array):
        if base._type_ is ctypes.c_char:
            return SynchronizedString(obj, lock)
        return SynchronizedArray(obj, lock)
    if issubclass(base, ctypes.Structure):
        return _synchronized_struct_class(base)(obj, lock)
    return Synchronized(obj, lock)


_struct_classes = {}


def _synchronized_struct_class(base):
    """A Synchronized subclass with one locked property per field (as multiprocessing)."""
    cls = _struct_classes.get(base)
    if cls is None:
        ns = {}
        for field in base._fields_:
            name = field[0]

            def get(self, name=name):
                with self._lock:
                    return getattr(self._obj, name)

            def set_(self, value, name=name):
                with self._lock:
                    setattr(self._obj, name, value)

            ns[name] = property(get, set_)
        cls = _struct_classes[base] = type("Synchronized" + base.__name__, (Synchronized,), ns)
    return cls


class SynchronizedBase(_core.SharedView):
    """A shared ctypes object plus its lock; the buffer and atomics come from SharedView."""

    def __new__(cls, obj, lock=None, ctx=None):
        seg, off = obj._pp_where
        code, length, scalar = _view_code(type(obj)._pp_base)
        self = super().__new__(cls, seg, off, code, length, scalar)
        self._obj = obj
        self._lock = lock if lock is not None else RLock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        return self

    def __init__(self, obj, lock=None, ctx=None):
        pass

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *args):
        return self._lock.__exit__(*args)

    def __reduce__(self):
        return (synchronized, (self._obj, self._lock))

    def get_obj(self):
        return self._obj

    def get_lock(self):
        return self._lock

    def __repr__(self):
        return "<%s wrapper for %s>" % (type(self).__name__, self._obj)


class Synchronized(SynchronizedBase):
    """``.value`` (from SharedView, in C) reads and writes under the lock."""


class SynchronizedArray(SynchronizedBase):
    def __len__(self):
        return len(self._obj)

    def __getitem__(self, i):
        with self._lock:
            return self._obj[i]

    def __setitem__(self, i, value):
        with self._lock:
            self._obj[i] = value


class SynchronizedString(SynchronizedArray):
    @property
    def value(self):
        with self._lock:
            return self._obj.value

    @value.setter
    def value(self, v):
        with self._lock:
            self._obj.value = v

    @property
    def raw(self):
        with self._lock:
            return self._obj.raw

    @raw.setter
    def raw(self, v):
        with self._lock:
            self._obj.raw = v


# ------------------------------------------------------------------------------------------
# Locks and semaphores (state in shared memory, see src/sync.c)

def _rebuild_semlock(cls, kind, handle, off):
    self = _core.SemLock.__new__(cls, _attach(handle), off, kind, 0, 1, False)
    return self


class _SemLockBase(_core.SemLock):
    _kind = _core.LOCK

    @classmethod
    def _create(cls, value, maxvalue):
        seg, off = _alloc(_core.SYNC_STATE_SIZE)
        return _core.SemLock.__new__(cls, seg, off, cls._kind, value, maxvalue, True)

    def __reduce__(self):
        return (_rebuild_semlock, (type(self), self.kind, _seg_handle(self._segment),
                                   self._offset))

    @property
    def _semlock(self):   # multiprocessing's synchronize code reaches the primitive this way
        return self


class Lock(_SemLockBase):
    """A process-shared, robust non-recursive lock (like multiprocessing.Lock)."""
    _kind = _core.LOCK

    def __new__(cls):
        return cls._create(1, 1)

    def __repr__(self):
        owner = self._owner_pid
        if owner == 0:
            name = "None"
        elif self._is_mine():
            name = "MainThread" if threading.current_thread() is threading.main_thread() \
                else threading.current_thread().name
        elif owner == os.getpid():
            name = "SomeOtherThread"
        else:
            name = "SomeOtherProcess"
        return "<%s(owner=%s)>" % (type(self).__name__, name)


class RLock(_SemLockBase):
    """A process-shared, robust recursive lock (like multiprocessing.RLock)."""
    _kind = _core.RLOCK

    def __new__(cls):
        return cls._create(1, 1)

    def __repr__(self):
        owner = self._owner_pid
        if owner == 0:
            name, count = "None", 0
        elif self._is_mine():
            name, count = threading.current_thread().name, self._count()
        elif owner == os.getpid():
            name, count = "SomeOtherThread", "nonzero"
        else:
            name, count = "SomeOtherProcess", "nonzero"
        return "<%s(%s, %s)>" % (type(self).__name__, name, count)


class Semaphore(_SemLockBase):
    """A process-shared semaphore (like multiprocessing.Semaphore)."""
    _kind = _core.SEMAPHORE

    def __new__(cls, value=1):
        return cls._create(value, _core.SEM_VALUE_MAX)

    def get_value(self):
        return self._get_value()

    def __repr__(self):
        return "<%s(value=%s)>" % (type(self).__name__, self._get_value())


class BoundedSemaphore(Semaphore):
    """A process-shared bounded semaphore (like multiprocessing.BoundedSemaphore)."""

    def __new__(cls, value=1):
        return cls._create(value, value)

    def __repr__(self):
        return "<%s(value=%s, maxvalue=%s)>" % (type(self).__name__, self._get_value(),
                                                 self.maxvalue)


def _pid_dead(pid):
    """True when process `pid` is gone or a zombie: it will never wake up or release anything."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X")


class Condition:
    """A process-shared condition variable (multiprocessing.synchronize.Condition's algorithm).

    Unlike multiprocessing's, a process that dies inside ``wait()`` does not deadlock the others
    (issue 8): each waiter holds a slot of a small shared table with its pid while it sleeps,
    and ``notify()``, while it waits for the waiters it woke, skips those whose process is dead.
    Beyond ``_WAITER_SLOTS`` simultaneous waiters, the extra ones wait unregistered (correct,
    but a death among them is not detected)."""

    _WAITER_SLOTS = 64
    _SLICE = 0.05       # notify() looks for dead waiters this often while it waits for them

    def __init__(self, lock=None, *, ctx=None):
        self._lock = lock or RLock()
        self._sleeping_count = Semaphore(0)
        self._woken_count = Semaphore(0)
        self._wait_semaphore = Semaphore(0)
        self._waiters = RawArray("i", self._WAITER_SLOTS)   # pid per sleeping waiter, 0 free
        self._make_methods()

    def __getstate__(self):
        return (self._lock, self._sleeping_count, self._woken_count, self._wait_semaphore,
                self._waiters)

    def __setstate__(self, state):
        (self._lock, self._sleeping_count, self._woken_count, self._wait_semaphore,
         self._waiters) = state
        self._make_methods()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *args):
        return self._lock.__exit__(*args)

    def _make_methods(self):
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __repr__(self):
        try:
            num_waiters = self._sleeping_count._get_value() - self._woken_count._get_value()
        except Exception:
            num_waiters = "unknown"
        return "<%s(%s, %s)>" % (type(self).__name__, self._lock, num_waiters)

    def _register(self):
        """A free waiter slot now holding this pid (under the lock), or -1 when all are taken."""
        pid = os.getpid()
        table = self._waiters
        for i in range(self._WAITER_SLOTS):
            if table.compare_exchange(i, 0, pid):
                return i
        return -1

    def _reap_dead(self):
        """Completes the wait of every registered waiter whose process died (as if it had
        woken); returns how many. Called with the lock held."""
        table = self._waiters
        reaped = 0
        for i in range(self._WAITER_SLOTS):
            pid = table.load(i)
            if pid and _pid_dead(pid) and table.compare_exchange(i, pid, 0):
                self._woken_count.release()     # what the dead waiter's finally would have done
                reaped += 1
        return reaped

    def wait(self, timeout=None):
        assert self._lock._is_mine(), "must acquire() condition before using wait()"
        slot = self._register()
        self._sleeping_count.release()          # this thread is going to sleep
        count = self._lock._count()
        for _ in range(count):
            self._lock.release()
        try:
            return self._wait_semaphore.acquire(True, timeout)
        finally:
            self._woken_count.release()         # this thread has woken
            if slot >= 0:
                self._waiters.store(slot, 0)
            for _ in range(count):
                self._lock.acquire()

    def notify(self, n=1):
        assert self._lock._is_mine(), "lock is not owned"
        assert not self._wait_semaphore.acquire(False), \
            "notify: Should not have been able to acquire _wait_semaphore"
        # account for timeouts since the last notify: subtract woken from sleeping (a waiter
        # killed between its two bookkeeping steps may leave a woken count without a sleeper)
        while self._woken_count.acquire(False):
            self._sleeping_count.acquire(False)
        sleepers = 0
        while sleepers < n and self._sleeping_count.acquire(False):
            self._wait_semaphore.release()      # wake up one sleeper
            sleepers += 1
        if sleepers:
            for _ in range(sleepers):
                # wait for a sleeper to wake; one that died never will: count it as woken
                while not self._woken_count.acquire(True, self._SLICE):
                    self._reap_dead()
            while self._wait_semaphore.acquire(False):
                pass                            # rezero in case some timeouts just happened

    def notify_all(self):
        self.notify(n=sys.maxsize)

    def wait_for(self, predicate, timeout=None):
        result = predicate()
        if result:
            return result
        endtime = None if timeout is None else time.monotonic() + timeout
        waittime = None
        while not result:
            if endtime is not None:
                waittime = endtime - time.monotonic()
                if waittime <= 0:
                    break
            self.wait(waittime)
            result = predicate()
        return result


class Event:
    """A process-shared event (like multiprocessing.Event)."""

    def __init__(self, *, ctx=None):
        self._cond = Condition(Lock())
        self._flag = Semaphore(0)

    def __getstate__(self):
        return (self._cond, self._flag)

    def __setstate__(self, state):
        self._cond, self._flag = state

    def is_set(self):
        with self._cond:
            if self._flag.acquire(False):
                self._flag.release()
                return True
            return False

    def set(self):
        with self._cond:
            self._flag.acquire(False)
            self._flag.release()
            self._cond.notify_all()

    def clear(self):
        with self._cond:
            self._flag.acquire(False)

    def wait(self, timeout=None):
        with self._cond:
            if self._flag.acquire(False):
                self._flag.release()
            else:
                self._cond.wait(timeout)
            if self._flag.acquire(False):
                self._flag.release()
                return True
            return False

    def __repr__(self):
        return f"<{type(self).__qualname__} at {id(self):#x} {'set' if self.is_set() else 'unset'}>"


class Barrier(threading.Barrier):
    """A process-shared barrier (like multiprocessing.Barrier); raises
    threading.BrokenBarrierError. A party whose process dies inside ``wait()`` breaks the
    barrier: the others get BrokenBarrierError when the last of them arrives or at their
    timeout (multiprocessing's hang).

    The shared record is ``[state, pid of each party inside wait() ...]``: the count of
    parties inside ``wait()`` is the number of pids recorded, so an arrival and a departure
    are one store each, made under the condition's lock. A party that dies at any point
    inside ``wait()`` leaves its pid there; the last arrival checks every recorded pid
    before it releases the others, and a dead one breaks the barrier instead of being counted
    as present."""

    def __init__(self, parties, action=None, timeout=None, *, ctx=None):
        if parties < 1:
            raise ValueError("parties must be > 0")
        self.__setstate__((parties, action, timeout, Condition(), RawArray("i", 1 + parties)))
        self._state = 0

    def __setstate__(self, state):
        (self._parties, self._action, self._timeout, self._cond, self._array) = state

    def __getstate__(self):
        return (self._parties, self._action, self._timeout, self._cond, self._array)

    @property
    def _state(self):
        return self._array[0]

    @_state.setter
    def _state(self, value):
        self._array[0] = value

    @property
    def _count(self):
        return self._parties - self._array[1:].count(0)

    @_count.setter
    def _count(self, value):
        # threading.Barrier.wait() only ever adds or removes its own party (under the lock):
        # record or forget this process's pid in one slot.
        change = value - self._count
        old, new = (0, os.getpid()) if change > 0 else (os.getpid(), 0)
        pids = self._array[1:]
        for _ in range(abs(change)):
            if old in pids:
                i = pids.index(old)
                pids[i] = new
                self._array[1 + i] = new

    def _drop_dead(self):
        """Forgets every recorded party whose process died inside wait(); returns how many.
        Called with the lock held."""
        dropped = 0
        for i, pid in enumerate(self._array[1:], 1):
            if pid and _pid_dead(pid):
                self._array[i] = 0
                dropped += 1
        return dropped

    def _release(self):
        # The count is complete, but a party counted in it may be dead: break the barrier
        # instead of letting the others through as if it were there.
        if self._drop_dead():
            self._break()
            raise threading.BrokenBarrierError
        super()._release()

    def _break(self):
        self._drop_dead()       # a dead party never leaves: reset() must not wait for it
        super()._break()

    def reset(self):
        with self._cond:
            self._drop_dead()
        super().reset()


# ------------------------------------------------------------------------------------------
# Demo: the bank account, three ways

def _bank_worker(payload, mode, n, slot):
    import pickle
    balance, lock, start, times = pickle.loads(payload)   # shared objects travel as handles
    start.wait()                                           # all depositors start together
    t0 = time.perf_counter()
    if mode == "nolock":
        for _ in range(n):
            balance.value += 1          # read, add, write: updates from the other side get lost
    elif mode == "lock":
        for _ in range(n):
            with lock:
                balance.value += 1
    else:
        add = balance.add
        for _ in range(n):
            add(1)                      # one lock-free atomic read-modify-write
    times[2 * slot] = t0
    times[2 * slot + 1] = time.perf_counter()


def bank_account_demo(processes=2, deposits=50_000):
    """Deposits 1 from each of `processes` processes `deposits` times into one shared balance:
    without a lock (lost updates: a wrong total whenever the processes really run at the same
    time), with a Lock, and with atomic adds. Times the deposits (first start to last end,
    measured in the workers). Returns rows ``(name, seconds, final_total, expected_total)``."""
    import multiprocessing as mp
    import pickle
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    rows = []
    expected = processes * deposits
    for name, mode in (("no lock", "nolock"), ("with Lock", "lock"), ("atomic add", "atomic")):
        balance = Value("q", 0, lock=False)
        times = RawArray("d", 2 * processes)
        payload = pickle.dumps((balance, Lock(), Barrier(processes), times))
        procs = [ctx.Process(target=_bank_worker, args=(payload, mode, deposits, i))
                 for i in range(processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError("a depositor process failed")
        seconds = max(times[1::2]) - min(times[0::2])
        rows.append((name, seconds, balance.value, expected))
    return rows
