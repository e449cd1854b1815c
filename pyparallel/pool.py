"""Pool and ThreadPool: drop-in replacements for :mod:`multiprocessing.pool`.

``pyparallel.Pool`` has the whole ``multiprocessing.Pool`` API and semantics (map, imap,
imap_unordered, starmap, apply and the ``_async`` forms with callbacks, close/join/terminate,
the context manager, initializer/initargs, maxtasksperchild, the stdlib's default chunksize,
its exception classes), on a shared-memory transport written in C::

    caller thread                      shared memory (memfd)               worker i
    -------------                      ---------------------               --------
    map(f, xs): chunk, pickle (p5) --> task ring i  (SPSC bytes, futex) --> recv, unpickle,
                 writes while it fits                                        run f(chunk)
                 big buffers -------> spill segment (reused) ------------> mapped, viewed
    AsyncResult.get() <-- collector <-- result ring i (SPSC bytes) <------- pickle, send
                          thread: poll(wake pipe + worker pidfds),
                          completes results, feeds the next chunks, replaces dead workers

There is no task-handler thread: the caller writes tasks into the rings itself, at most
``WINDOW`` chunks ahead per worker; the rest is fed by the collector as results come back
(it writes the next tasks before it unpickles the results that freed the room), so ``imap``
over an endless generator holds a bounded window in memory (at most ``4 * WINDOW *
processes`` results wait unread). A ``range`` is chunked into ranges, and long lists of plain
ints or floats (chunks of arguments, chunks of results) travel as packed arrays.

Large buffers (numpy arrays, bytes: pickle protocol 5 out of band) are copied once: a task
whose buffers add up to ``_serialize.SPILL_MIN`` or more has them copied into a shared
segment of the pool's that the worker maps and unpickles from in place; segments are reused
from task to task, and one that a task still references after it returned (kept in a global,
say) is never written again. Smaller ones are copied into the ring (and out of it).

Waiting: a worker polls its ring for 50 us after a task before it sleeps on a futex, and a
caller about to block in ``get()``/``next()`` first polls the result rings itself for
``SPIN_US`` and completes what arrived, so a short round trip costs no sleep and no wakeup
(each costs tens of microseconds on a busy or virtual machine). A caller that found its
result that way holds a 1 ms lease during which workers do not wake the collector (it looks
by itself when the lease ends); otherwise the collector is woken through a pipe, only when it
said it sleeps.

Under the fork start method the workers are forked directly (:mod:`pyparallel._fork`:
multiprocessing's own child bootstrap, without its Popen bookkeeping; they are watched
through pidfds and are not in ``multiprocessing.active_children()``); under forkserver and
spawn they are the context's Processes.

Each worker serves one slot: its own pair of rings, so a worker's death can corrupt nothing
but its slot, which is reset before the replacement starts; results come back in order per
slot, so the task a dead worker was running is the oldest one it held.

What it adds over multiprocessing:

- **Nothing hangs.** A worker killed mid-task (SIGKILL, segfault, ``os._exit``) fails the
  task it was running with :class:`WorkerLostError` (naming the pid and the signal or exit
  code); the tasks queued behind it are resent, a new worker takes the slot, the map goes on.
  An exception in the initializer fails every task with :class:`InitializerError` instead of
  respawning workers forever. ``terminate()`` fails whatever is still pending with
  :class:`PoolTerminatedError` instead of leaving ``get()`` waiting forever. An exception in
  a callback is printed and does not kill the pool.
- **Ctrl-C** in ``map``/``starmap``/``apply``/``imap`` terminates the pool's workers and
  raises KeyboardInterrupt in the caller; workers ignore SIGINT themselves.
- **Unpicklable arguments** raise in the caller, at submission, for ``map``, ``starmap``,
  ``apply`` and their ``_async`` forms (``imap`` fails the item, like the stdlib).
- **Functions are pickled by value** when they cannot be pickled by reference (lambdas,
  closures, functions from ``__main__`` or a notebook), so they work under every start
  method.
- **Native kernels** (``pyparallel.kernels.fib`` ...) given to ``map``/``imap``/``apply``
  run in-process on ``processes`` threads through their bulk path: no pickling, no processes.

Start method: ``context=`` takes a multiprocessing context or a name ("fork", "forkserver",
"spawn"). The default is **fork when it is safe** (this process has a single OS thread,
counting /proc/self/task but not pyparallel pools' own collector threads, so no OpenMP
runtime or other library thread could be caught mid-lock by the fork) and **forkserver
otherwise** (importing numpy starts an OpenBLAS thread, so with numpy the default is
forkserver; ``context="fork"`` chooses fork explicitly). Workers are found through ``/proc/<parent>/fd``, the same way under all three.
"""
from __future__ import annotations

import atexit
import collections
import itertools
import multiprocessing
import multiprocessing.pool as _mpp
import os
import signal
import sys
import threading
import traceback
import warnings
import weakref
from _thread import allocate_lock as _allocate_lock
from time import monotonic as _monotonic

from . import _core, _fork, _serialize, _worker
from ._cpu import cpu_count

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
    "TimeoutError",
    "RemoteTraceback",
    "MaybeEncodingError",
    "default_start_method",
]

TimeoutError = multiprocessing.TimeoutError
RemoteTraceback = _mpp.RemoteTraceback
MaybeEncodingError = _mpp.MaybeEncodingError

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"

#: chunks sent ahead to each worker (one running, the rest queued in its ring) ...
WINDOW = 2
#: ... unless tasks take longer than this (seconds): then one each, for the best balance
LONG_TASK = 0.010
TASK_RING_BYTES = 8 << 20
RESULT_RING_BYTES = 2 << 20
#: the collector looks at everything at least this often, whatever the wakeups say
_SAFETY_WAIT = 1.0


class WorkerLostError(multiprocessing.ProcessError):
    """A worker process died while it held the task; the pool replaced it."""


class InitializerError(multiprocessing.ProcessError):
    """The pool's initializer raised in a worker; the pool cannot run tasks."""


class PoolTerminatedError(multiprocessing.ProcessError):
    """The pool was terminated before the task completed."""


def _describe_exit(pid, code):
    if code is None or code == _fork.UNKNOWN_EXIT:
        return f"worker process {pid} died"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker process {pid} was killed by {name}"
    return f"worker process {pid} exited with code {code}"


_my_pid = os.getpid()  # os.getpid() is a system call; this one is kept right across forks


def _forked():
    global _my_pid
    _my_pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


# ---- start methods ------------------------------------------------------------------------

_collectors = weakref.WeakSet()  # live collector threads, not counted by the fork-safety rule


def _foreign_thread_count():
    """OS threads of this process other than pyparallel's own fork-safe ones (pools'
    collectors, the kernels' thread team)."""
    own = {t.native_id for t in list(_collectors) if t.is_alive()}
    own.update(_core.team_thread_ids())
    try:
        tids = {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return threading.active_count() - len(own)
    return len(tids - own)


def default_start_method() -> str:
    """"fork" when this process is single-threaded (ignoring pools' collector threads and
    the kernels' team, which are fork-safe), else "forkserver" (or "spawn" where forkserver
    does not exist)."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and _foreign_thread_count() <= 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def _resolve_context(context):
    if context is None:
        return multiprocessing.get_context(default_start_method())
    if isinstance(context, str):
        return multiprocessing.get_context(context)
    return context


# ---- results ------------------------------------------------------------------------------


def _guard(cb):
    """A callback that cannot take the collector down: its exception is printed."""
    if cb is None:
        return None

    def guarded(value):
        try:
            cb(value)
        except BaseException:
            print(f"Exception in pyparallel pool callback {cb!r}:", file=sys.stderr)
            traceback.print_exc()

    return guarded


class _Flag:
    """threading.Event's is_set/set/wait on one lock: a tenth of the cost to create, and
    results are created once per apply_async."""

    __slots__ = ("_lock", "_flag")

    def __init__(self):
        self._flag = False
        self._lock = _allocate_lock()
        self._lock.acquire()

    def is_set(self):
        return self._flag

    def set(self):
        if not self._flag:
            self._flag = True
            self._lock.release()

    def wait(self, timeout=None):
        if self._flag:
            return True
        if self._lock.acquire(True, -1 if timeout is None else max(timeout, 0)):
            self._lock.release()  # let the next waiter through
        return self._flag


class ApplyResult(_mpp.ApplyResult):
    """The result of ``apply_async`` (a ``multiprocessing.pool.ApplyResult``)."""

    def __init__(self, pool, callback, error_callback):
        # multiprocessing.pool.ApplyResult.__init__, with a lighter event
        self._pool = pool
        self._event = _Flag()
        self._job = next(_mpp.job_counter)
        self._cache = pool._cache
        self._callback = _guard(callback)
        self._error_callback = _guard(error_callback)
        self._cache[self._job] = self

    def wait(self, timeout=None):
        if not self._event.is_set():
            _help(self._pool, self._event.is_set)
        self._event.wait(timeout)

    def get(self, timeout=None):
        pool = self._pool
        try:
            return _mpp.ApplyResult.get(self, timeout)
        except KeyboardInterrupt:
            if pool is not None:
                pool.terminate()
            raise


AsyncResult = ApplyResult


class MapResult(_mpp.MapResult):
    """The result of ``map_async``/``starmap_async``."""

    def __init__(self, pool, chunksize, length, callback, error_callback):
        super().__init__(pool, chunksize, length, _guard(callback), _guard(error_callback))

    get = ApplyResult.get
    wait = ApplyResult.wait


class IMapIterator(_mpp.IMapIterator):
    """The iterator ``imap`` returns (``next(timeout)`` as in multiprocessing)."""

    _issued = 0  # items handed to workers
    _taken = 0  # items the caller has taken
    _engine = None  # set while the source is throttled: to wake when the caller catches up

    def next(self, timeout=None):
        pool = self._pool
        if not self._items:
            _help(pool, self._items.__len__)
        try:
            value = _mpp.IMapIterator.next(self, timeout)
        except KeyboardInterrupt:
            if pool is not None:
                pool.terminate()
            raise
        except Exception:
            self._took()
            raise
        self._took()
        return value

    def _took(self):
        self._taken += 1
        eng = self._engine
        if eng is not None:
            self._engine = None
            eng.kick()

    __next__ = next


class IMapUnorderedIterator(_mpp.IMapUnorderedIterator, IMapIterator):
    """The iterator ``imap_unordered`` returns."""

    _set = _mpp.IMapUnorderedIterator._set


#: a caller about to block on a result first polls the rings itself this long (microseconds)
SPIN_US = 150.0
#: ... unless tasks take longer than this on average (seconds; well above SPIN_US, as a task's
#: time as measured here includes the wait for its result to be noticed)
_NO_SPIN_TASK = 0.001


def _help(pool, done):
    """Before blocking on a result: collect it ourselves if it comes within SPIN_US, saving
    the collector's wakeup and ours (tens of microseconds each on a busy machine)."""
    eng = getattr(pool, "_engine", None)
    if (eng is None or not eng.warm or eng.task_time > _NO_SPIN_TASK
            or eng.state == TERMINATE or eng.ch is None):
        # No use spinning for workers that never answered yet (still starting) or for tasks
        # that take far longer than the spin: it would only keep a CPU from the workers.
        return
    try:
        if eng.ch.spin(SPIN_US):
            eng.collect_now()
    except ValueError:  # the channel was closed meanwhile
        pass


def _abort(result, err):
    """Complete a pending result (any kind) with ``err``."""
    if isinstance(result, _mpp.IMapIterator):
        with result._cond:
            result._items.append((False, err))
            result._index += 1
            result._unsorted.clear()
            result._length = result._index
            result._cond.notify_all()
        result._cache.pop(result._job, None)
        result._pool = None
        return
    if result._event.is_set():
        return
    result._success = False
    result._value = err
    if result._error_callback:
        result._error_callback(err)
    result._event.set()
    result._cache.pop(result._job, None)
    result._pool = None


class _SpillPool:
    """Shared segments for tasks' large buffers (see _serialize.spill), reused: a new segment
    costs page faults as it is first written, a reused one only the copy. Its first word is
    SPILL_BUSY from the moment it is given to a task until the worker has no view of it left
    (SPILL_FREE; the worker keeps it mapped for the next time). One still busy after its task
    completed is referenced in the worker (the task kept a view) and is not reused."""

    ROUND = 1 << 20
    KEEP_BYTES = 256 << 20  # free segments kept, at most

    def __init__(self, keep):
        self.keep = keep
        self.free = []

    def spill(self, parts):
        """(message parts to write, segment or None) for a task's parts."""
        need = _serialize.spill_size(parts) if len(parts) > 2 else 0
        if not need:
            return parts, None
        seg = self._take(need)
        try:
            return _serialize.spill(parts, seg), seg
        except BaseException:
            seg.close()
            raise

    def _take(self, size):
        for i, seg in enumerate(self.free):
            if size <= seg.size <= 2 * size and seg.load32(0) == _serialize.SPILL_FREE:
                del self.free[i]
                break
        else:
            seg = _core.Segment(-(-size // self.ROUND) * self.ROUND)
        seg.store32(0, _serialize.SPILL_BUSY)
        return seg

    def give(self, seg, worker_gone=False):
        """Back from a completed task (or from a worker that died: nothing maps it now)."""
        if worker_gone:
            seg.store32(0, _serialize.SPILL_FREE)
        self.free.append(seg)
        total = sum(s.size for s in self.free)
        while self.free and (len(self.free) > self.keep or total > self.KEEP_BYTES):
            old = self.free.pop(0)
            total -= old.size
            _SpillPool.evict(old)

    @staticmethod
    def evict(seg):
        """Stops using seg; workers that keep it mapped let go of it at their next task."""
        seg.store32(0, _serialize.SPILL_EVICTED)
        seg.close()

    def close(self):
        for seg in self.free:
            _SpillPool.evict(seg)
        self.free.clear()


def _decode_result(msg):
    """(success, value) from a result message; a result that cannot be unpickled here fails
    its task with the reason."""
    try:
        return _serialize.decode(msg)[1]
    except Exception as e:
        return (False, e)


# ---- the process pool's engine ------------------------------------------------------------


class _Engine:
    """Workers, channel, scheduling and the collector thread. Holds no reference to the Pool,
    so an abandoned Pool is garbage-collected (and its workers reaped)."""

    def __init__(self, processes, ctx, init, maxtasks, cache):
        self.n = processes
        self.threads = max(1, cpu_count() // processes)  # each worker's share, for kernels
        self.pid = os.getpid()  # a forked copy of this engine must not touch the workers
        self.ctx = ctx
        self.direct_fork = ctx.get_start_method() == "fork" and _fork.available()
        self.init = init
        self.maxtasks = maxtasks
        self.cache = cache
        self.ch = _core.Channel(processes, TASK_RING_BYTES, RESULT_RING_BYTES)
        self.lock = threading.Lock()
        self.state = RUN
        self.workers = [None] * processes
        self.sent = [0] * processes  # tasks sent to the slot's current worker
        self.inflight = [collections.deque() for _ in range(processes)]
        self.outgoing = [None] * processes  # (parts, pos, size) of a message being written
        self.stalled = 0  # how many outgoing entries are not None
        self.tasks = {}  # tid -> (result, index, parts, dispatch time, spill segment)
        self.spills = _SpillPool(keep=2 * processes + 2)
        self.task_time = 0.0  # moving average of the tasks' service times (seconds)
        self.last_result = [0.0] * processes
        self.retry = collections.deque()  # (result, index, tid, parts) to send first
        self.jobs = []  # (iterator of (result, index, tid, parts | exception), throttle)
        self.ahead = max(4 * WINDOW * processes, 16)  # imap: results allowed to wait unread
        self.tid = itertools.count()
        self.broken = None
        self.leaving = False
        self.warm = False  # a worker has answered (before that, callers do not spin)
        # The workers are forked first, while this process has no thread of the pool's own;
        # then the collector starts (it replaces dead workers later, from its own thread:
        # idle in poll(), it holds no lock a forked worker could inherit).
        self.thread = None
        try:
            with self.lock:
                for i in range(processes):
                    self._spawn(i)
            thread = threading.Thread(target=self._collect, name="pyparallel-collector",
                                      daemon=True)
            _collectors.add(thread)
            thread.start()
            self.thread = thread
        except BaseException:
            self.terminate()
            self.ch.close()
            raise

    # -- workers --

    def _spawn(self, slot):
        fd, pipe_fd = self.ch.fds
        p = self.ctx.Process(
            target=_worker.main,
            args=(os.getpid(), fd, pipe_fd, slot, self.init, self.maxtasks, self.threads),
            name=f"PyParallelPoolWorker-{slot}",
            daemon=True,
        )
        if self.direct_fork:
            p = _fork.ForkedProcess(p)
        else:
            p.start()
        self.workers[slot] = p
        self.sent[slot] = 0

    def _kill_all(self):
        procs = [p for p in self.workers if p is not None]
        for p in procs:
            if p.exitcode is None:
                try:
                    p.kill()
                except (OSError, AttributeError):
                    pass
        for p in procs:
            p.join(5)
            try:
                p.close()
            except ValueError:
                pass
        self.workers = [None] * self.n

    # -- scheduling (self.lock held) --

    def _next_task(self, done):
        if self.retry:
            return self.retry.popleft()
        i = 0
        while i < len(self.jobs):
            source, result = self.jobs[i]
            if result is not None and result._issued - result._taken >= self.ahead:
                result._engine = self  # imap: the caller is behind; wait for it
                if result._issued - result._taken >= self.ahead:
                    i += 1
                    continue
                result._engine = None
            try:
                item = next(source)
            except StopIteration:
                del self.jobs[i]
                continue
            except Exception as e:  # pragma: no cover - sources catch their own errors
                del self.jobs[i]
                print("pyparallel: task source failed:", repr(e), file=sys.stderr)
                continue
            if result is not None:
                result._issued += 1
            result, idx, tid, parts = item
            if tid is None:  # could not be encoded: fail that item only
                done.append((result, idx, (False, parts)))
                continue
            return item
        return None

    def _pump(self, done):
        """Write what fits: stalled messages first, then new tasks to the least-busy slots."""
        if self.broken is not None:
            self._fail_everything(self.broken, done)
            return
        if not self.jobs and not self.retry and self.stalled == 0:
            return
        written = []
        try:
            self._write_tasks(done, written)
        finally:
            for slot in written:  # wake the workers only once everything is written
                self.ch.wake(slot)

    def _write_tasks(self, done, written):
        for slot, out in enumerate(self.outgoing):
            if out is not None:
                parts, pos, size = out
                pos = self.ch.put(slot, parts, pos, False)
                written.append(slot)
                if pos == size:
                    self.outgoing[slot] = None
                    self.stalled -= 1
                else:
                    self.outgoing[slot] = (parts, pos, size)
        while True:
            slot = self._free_slot()
            if slot is None:
                return
            item = self._next_task(done)
            if item is None:
                return
            self._dispatch(slot, *item)
            if slot not in written:
                written.append(slot)

    def _free_slot(self):
        """The slot with the fewest tasks in flight among those that may take one more."""
        window = 1 if self.task_time > LONG_TASK else WINDOW
        best, fewest = None, window
        for slot in range(self.n):
            k = len(self.inflight[slot])
            if (k < fewest and self.workers[slot] is not None and self.outgoing[slot] is None
                    and (self.maxtasks is None or self.sent[slot] < self.maxtasks)):
                best, fewest = slot, k
        return best

    def _dispatch(self, slot, result, idx, tid, parts):
        """Writes a task into the slot's ring (the rest later, if it does not fit now)."""
        msg, seg = self.spills.spill(parts)
        self.tasks[tid] = (result, idx, parts, _monotonic(), seg)
        self.inflight[slot].append(tid)
        self.sent[slot] += 1
        pos = self.ch.put(slot, msg, 0, False)
        size = _serialize.parts_size(msg)
        if pos != size:
            self.outgoing[slot] = (msg, pos, size)
            self.stalled += 1

    def _fail_everything(self, err, done):
        """Every pending result fails with err (the pool cannot run tasks any more)."""
        for slot in range(self.n):
            self.inflight[slot].clear()
            self.outgoing[slot] = None
        self.stalled = 0
        self._drop_tasks()
        self.retry.clear()
        self.jobs.clear()
        for result in list(self.cache.values()):
            done.append((result, None, err))

    def _on_message(self, slot, msg, done):
        """Accounts for a result message; its unpickling is left to _complete, outside the
        lock, so that the next tasks are written first and the workers do not wait for it."""
        tid = _serialize.peek_tid(msg)
        if tid == _worker.INIT_FAILED_TID:
            obj = _decode_result(msg)
            cause = obj if isinstance(obj, BaseException) else None
            err = InitializerError(f"the pool's initializer raised in a worker: {cause!r}")
            err.__cause__ = cause
            self.broken = err
            return
        entry = self.tasks.pop(tid, None)
        if entry is None:
            return
        self.warm = True
        dq = self.inflight[slot]
        if dq and dq[0] == tid:
            dq.popleft()
        else:
            try:
                dq.remove(tid)
            except ValueError:
                pass
        # Service time of the task (it may have waited in the ring behind the previous one):
        # long tasks are not queued ahead, so that a free worker always takes the next one.
        now = _monotonic()
        dt = now - max(entry[3], self.last_result[slot])
        self.last_result[slot] = now
        self.task_time += 0.3 * (dt - self.task_time)
        if entry[4] is not None:
            self.spills.give(entry[4])
        done.append((entry[0], entry[1], msg))

    def _drain_all(self, done):
        """Takes every slot's results (self.lock held); False once the pool is terminated."""
        if self.state == TERMINATE:
            return False
        for slot in range(self.n):
            if self.workers[slot] is not None:
                self._drain(slot, done)
        return True

    def _drain(self, slot, done):
        while True:
            msg = self.ch.get(slot)
            if msg is None:
                return
            self._on_message(slot, msg, done)

    def _reap(self, slot, done):
        """The slot's worker has exited: account for its tasks, replace it if needed."""
        p = self.workers[slot]
        self._drain(slot, done)
        p.join(1)
        code = p.exitcode
        held = self.inflight[slot]
        if held:
            # Results come back in order, so the oldest task is the one it was running.
            tid = held.popleft()
            result, idx, _, _, seg = self.tasks.pop(tid)
            if seg is not None:
                self.spills.give(seg, worker_gone=True)
            if self.broken is None:
                err = WorkerLostError(_describe_exit(p.pid, code) + " while running a task")
                done.append((result, idx, (False, err)))
            else:
                done.append((result, idx, (False, self.broken)))
            while held:  # never started: send them again
                t = held.pop()
                r, i, parts, _, seg = self.tasks.pop(t)
                if seg is not None:
                    self.spills.give(seg, worker_gone=True)
                self.retry.appendleft((r, i, t, parts))
        if self.outgoing[slot] is not None:
            self.outgoing[slot] = None
            self.stalled -= 1
        try:
            p.close()
        except ValueError:
            pass
        self.workers[slot] = None
        self.ch.reset(slot)
        if self.broken is None and self.state != TERMINATE and not self.leaving:
            self._spawn(slot)

    def _idle(self):
        return not self.tasks and not self.retry and not self.jobs

    def _drop_tasks(self):
        """Forget every task in flight (the pool failed or was terminated)."""
        for entry in self.tasks.values():
            if entry[4] is not None:
                _SpillPool.evict(entry[4])
        self.tasks.clear()

    def _leave_if_done(self):
        """Closed and idle: ask every worker to leave (once). True once they were asked."""
        if self.state != CLOSE or not self._idle():
            return False
        if not self.leaving:
            self.leaving = True
            for slot, p in enumerate(self.workers):
                if p is not None:
                    self.ch.put(slot, ())  # an empty message: leave
        return True

    # -- the collector thread --

    def _collect(self):
        try:
            self._collect_loop()
        except BaseException:  # pragma: no cover - a bug: do not leave callers waiting
            traceback.print_exc()
            with self.lock:
                self.state = TERMINATE
                err = PoolTerminatedError("pyparallel pool collector failed")
                done = []
                self._fail_everything(err, done)
            self._complete(done)
            self._kill_all()
        if self.state == TERMINATE and self.pid == _my_pid:
            self._release()

    def _complete(self, done):
        """Completes results (outside the lock): obj is (success, value), an exception (idx
        None: abort the whole result) or a result message still to be unpickled."""
        for result, idx, obj in done:
            try:
                if idx is None:
                    _abort(result, obj)
                else:
                    if type(obj) is bytearray:
                        obj = _decode_result(obj)
                    result._set(idx, obj)
            except KeyError:  # already completed (terminate)
                pass

    def _collect_loop(self):
        ch = self.ch
        while True:
            sentinels = [p.sentinel for p in self.workers if p is not None]
            ch.wait(sentinels, _SAFETY_WAIT)
            done = []
            finished = False
            with self.lock:
                if not self._drain_all(done):
                    return
                for slot, p in enumerate(self.workers):
                    if p is not None and p.exitcode is not None:
                        self._reap(slot, done)
                if self.broken is not None:
                    self._fail_everything(self.broken, done)
                else:
                    self._pump(done)
                if self._leave_if_done():
                    if all(p is None or p.exitcode is not None for p in self.workers):
                        for slot, p in enumerate(self.workers):
                            if p is not None:
                                self._reap(slot, done)
                        finished = True
            self._complete(done)
            if finished:
                return

    # -- called by the Pool --

    def submit(self, source, throttle=None):
        """Queue a task source and write what fits right away, from the caller's thread.
        ``throttle``: an IMapIterator whose unconsumed results bound how far ahead to go."""
        done = []
        with self.lock:
            self.jobs.append((source, throttle))
            self._pump(done)
        self._complete(done)

    def submit_one(self, result, tid, parts):
        """One task (apply_async): straight to the least busy worker when nothing waits
        ahead of it, else queued behind what does."""
        with self.lock:
            if (self.jobs or self.retry or self.stalled or self.broken is not None
                    or self.state != RUN):
                slot = None
            else:
                slot = self._free_slot()
            if slot is not None:
                self._dispatch(slot, result, 0, tid, parts)
                self.ch.wake(slot)
                return
        self.submit(iter(((result, 0, tid, parts),)))

    def collect_now(self):
        """A caller collects results (and feeds tasks) instead of the collector thread."""
        done = []
        with self.lock:
            if not self._drain_all(done):
                return
            self._pump(done)
        self._complete(done)

    def kick(self):
        """The caller consumed imap results: feed more."""
        self.ch.notify()

    def close(self):
        with self.lock:
            if self.state == RUN:
                self.state = CLOSE
                self._leave_if_done()  # idle: the workers start leaving now
        self.ch.notify()

    def terminate(self):
        if _my_pid != self.pid:
            return
        with self.lock:
            already = self.state == TERMINATE
            self.state = TERMINATE
        if not already:
            self.ch.notify()
            if self.thread is not None and self.thread is not threading.current_thread():
                self.thread.join(5)
            self._kill_all()
            err = PoolTerminatedError("the pool was terminated before the task completed")
            for result in list(self.cache.values()):
                _abort(result, err)
            with self.lock:
                self._drop_tasks()
                self.jobs.clear()
                self.retry.clear()
            if self.thread is None or not self.thread.is_alive():
                self._release()
            # else: the collector itself is terminating (from a callback); it releases on
            # its way out

    def _release(self):
        """The workers are gone: unmap the channel, close the spill segments."""
        with self.lock:
            self.spills.close()
        self.ch.close()

    def join(self):
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        if self.state == TERMINATE:
            self._kill_all()
        else:
            for p in self.workers:
                if p is not None:
                    p.join()
            self.workers = [None] * self.n
        self._release()


_engines = weakref.WeakSet()


@atexit.register
def _terminate_all():  # interpreter exit reaps every worker
    for eng in list(_engines):
        try:
            eng.terminate()
        except Exception:
            pass


# ---- the public Pool ----------------------------------------------------------------------


def _is_kernel(func, _Kernel=_core.Kernel):
    return type(func) is _Kernel and func.unary


def _chunks(iterable, size):
    it = iter(iterable)
    while True:
        chunk = tuple(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


class Pool:
    """A process pool with the API of ``multiprocessing.Pool``; see the module docstring."""

    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                 context=None):
        self._state = None  # not RUN: a failed __init__ must not warn in __del__
        self._cache = {}
        self._engine = None
        if processes is None:
            processes = cpu_count()
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._processes = processes
        self._ctx = _resolve_context(context)
        init = None
        if initializer is not None:
            init = _serialize.dumps_by_value((initializer, tuple(initargs)))
        self._engine = _Engine(processes, self._ctx, init, maxtasksperchild, self._cache)
        _engines.add(self._engine)
        self._state = RUN

    # -- state --

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")
        if self._engine.pid != _my_pid:
            raise ValueError("Pool not running: it belongs to the process that created it")

    def __reduce__(self):
        raise NotImplementedError(
            "pool objects cannot be passed between processes or pickled")

    def __repr__(self):
        cls = self.__class__
        return (f"<{cls.__module__}.{cls.__qualname__} state={self._state} "
                f"pool_size={self._processes}>")

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, *exc):
        self.terminate()

    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if self._state == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            eng = self._engine
            if eng is not None:
                eng.terminate()

    def close(self):
        """No more tasks; workers leave once everything submitted is done."""
        if self._state == RUN:
            self._state = CLOSE
            self._engine.close()

    def terminate(self):
        """Stop the workers now; pending results fail with PoolTerminatedError."""
        self._state = TERMINATE
        if self._engine is not None:
            self._engine.terminate()

    def join(self):
        """Wait for the workers to exit; call close() or terminate() first."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        elif self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._engine.join()

    # -- submission helpers --

    def _submit(self, source, throttle=None):
        self._submitting(self._engine.submit, source, throttle)

    def _submitting(self, how, *args):
        try:
            how(*args)
        except KeyboardInterrupt:
            # Ctrl-C while tasks were being written: the pool's books may be half done, so
            # stop it, as Ctrl-C while waiting does.
            self.terminate()
            raise

    def _encode(self, fb, args, kind):
        tid = next(self._engine.tid)
        if kind == _worker.MAP:  # a chunk the worker only iterates over
            args = _serialize.pack_numbers(args)
        return tid, _serialize.encode(tid, (fb, args, kind))

    def _eager(self, result, fb, batches, kind):
        out = []
        for i, args in enumerate(batches):
            tid, parts = self._encode(fb, args, kind)
            out.append((result, i, tid, parts))
        return out

    def _lazy(self, result, fb, iterable, chunksize, set_length):
        """Encodes imap's items as workers free up; an item that cannot be pickled (or an
        iterable that raises) fails that item, as in multiprocessing."""
        i = -1
        try:
            if chunksize == 1:
                batches, kind = (((x,), {}) for x in iterable), _worker.APPLY
            else:
                batches, kind = _chunks(iterable, chunksize), _worker.MAP
            for i, args in enumerate(batches):
                try:
                    tid, parts = self._encode(fb, args, kind)
                except Exception as e:
                    yield (result, i, None, e)
                    continue
                yield (result, i, tid, parts)
        except Exception as e:
            i += 1
            yield (result, i, None, e)
        set_length(i + 1)

    def _map_async(self, func, iterable, kind, chunksize=None, callback=None, error_callback=None):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), self._processes * 4)
            if extra:
                chunksize += 1
        if len(iterable) == 0:
            chunksize = 0
        if _is_kernel(func):
            return self._kernel_async(func, iterable, kind, chunksize, len(iterable), callback,
                                      error_callback)
        fb = _serialize.dumps_func(func)
        result = MapResult(self, chunksize, len(iterable), callback, error_callback=error_callback)
        if chunksize:
            try:
                if isinstance(iterable, range):  # a range's chunks are ranges: 3 ints each
                    batches = (iterable[i:i + chunksize]
                               for i in range(0, len(iterable), chunksize))
                else:
                    batches = _chunks(iterable, chunksize)
                items = self._eager(result, fb, batches, kind)
            except BaseException:
                self._cache.pop(result._job, None)
                raise
            self._submit(iter(items))
        return result

    def _kernel_async(self, func, iterable, kind, chunksize, length, callback, error_callback):
        """A native kernel: its bulk path on `processes` threads, in this process."""
        items = list(iterable)
        if kind == _worker.STARMAP:
            items = [a[0] if len(a) == 1 else _bad_star(func, a) for a in items]
        result = MapResult(self, max(length, 1), length, callback, error_callback) if length \
            else MapResult(self, 0, 0, callback, error_callback)
        if not length:
            return result

        def run():
            try:
                obj = (True, func.map(items, threads=self._processes))
            except Exception as e:
                obj = (False, e)
            result._set(0, obj)

        threading.Thread(target=run, daemon=True, name="pyparallel-kernel").start()
        return result

    # -- the API --

    def apply(self, func, args=(), kwds={}):
        """``func(*args, **kwds)`` in a worker; blocks until the result is ready."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):
        self._check_running()
        result = ApplyResult(self, callback, error_callback)
        if _is_kernel(func) and not kwds:
            def run():
                try:
                    obj = (True, func(*args))
                except Exception as e:
                    obj = (False, e)
                result._set(0, obj)

            threading.Thread(target=run, daemon=True, name="pyparallel-kernel").start()
            return result
        try:
            tid, parts = self._encode(_serialize.dumps_func(func), (tuple(args), dict(kwds)),
                                      _worker.APPLY)
        except BaseException:
            self._cache.pop(result._job, None)
            raise
        self._submitting(self._engine.submit_one, result, tid, parts)
        return result

    def map(self, func, iterable, chunksize=None):
        """``list(map(func, iterable))`` computed in the workers, in chunks."""
        return self._map_async(func, iterable, _worker.MAP, chunksize).get()

    def starmap(self, func, iterable, chunksize=None):
        """Like map, with each item unpacked as arguments: ``func(*item)``."""
        return self._map_async(func, iterable, _worker.STARMAP, chunksize).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, _worker.MAP, chunksize, callback, error_callback)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, _worker.STARMAP, chunksize, callback,
                               error_callback)

    def _imap(self, cls, func, iterable, chunksize):
        self._check_running()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        if _is_kernel(func):
            return _kernel_imap(func, iterable, max(chunksize, 64 * self._processes),
                                self._processes)
        fb = _serialize.dumps_func(func)
        result = cls(self)
        self._submit(self._lazy(result, fb, iterable, chunksize, result._set_length),
                            result)
        if chunksize == 1:
            return result
        return (item for chunk in result for item in chunk)

    def imap(self, func, iterable, chunksize=1):
        """Like map, lazily: results in order, inputs consumed as workers free up."""
        return self._imap(IMapIterator, func, iterable, chunksize)

    def imap_unordered(self, func, iterable, chunksize=1):
        """Like imap, results in completion order."""
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize)


def _bad_star(func, args):
    raise TypeError(f"{func!r} takes 1 argument ({len(args)} given)")


def _kernel_imap(func, iterable, batch, threads):
    for chunk in _chunks(iterable, batch):
        yield from func.map(list(chunk), threads=threads)


# ---- ThreadPool -----------------------------------------------------------------------------


class ThreadPool(_mpp.ThreadPool):
    """``multiprocessing.pool.ThreadPool`` with pyparallel's defaults: ``processes`` threads
    (default ``cpu_count()``), callbacks that cannot kill the pool, native kernels on their
    bulk path."""

    def __init__(self, processes=None, initializer=None, initargs=()):
        if processes is None:
            processes = cpu_count()
        super().__init__(processes, initializer, initargs)

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):
        return super().apply_async(func, args, kwds, _guard(callback), _guard(error_callback))

    def map(self, func, iterable, chunksize=None):
        if _is_kernel(func):
            self._check_running()
            return func.map(list(iterable), threads=self._processes)
        return super().map(func, iterable, chunksize)

    def _map_async(self, func, iterable, mapper, chunksize=None, callback=None,
                   error_callback=None):
        return super()._map_async(func, iterable, mapper, chunksize, _guard(callback),
                                  _guard(error_callback))
