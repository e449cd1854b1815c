"""The local backend: worker processes, their rings, scheduling and the collector thread.

Each worker serves one **slot**: its own pair of rings in one shared memfd (tasks in, results
out), so a worker's death can corrupt nothing but its slot, which is reset before the
replacement starts; results come back in order per slot, so the task a dead worker was
running is the oldest one it held.

- **Submitting** encodes a job's chunks (all of them before anything is sent, unless the job
  is lazy) and writes what fits straight into the least busy slots from the caller's thread,
  at most ``WINDOW`` chunks ahead per worker (one when tasks are long); the rest is fed as
  results come back.
- **Functions** are sent to each worker once: a DEFINE message (see :mod:`.wire`) goes
  before the first task of a function to a slot whose worker lacks it, and tasks name the
  function by its id. A function with big globals costs one copy per worker, not per task.
- **Collecting**: one thread sleeps in ``poll()`` on a wake-up pipe and the workers' pidfds
  (GIL released); a caller about to block spins on the rings for ``SPIN_US`` first and
  collects what arrived itself (:meth:`LocalBackend.help`). Results are unpickled outside the
  lock, after the next tasks were written, in one place (:meth:`LocalBackend._complete`) that
  catches BaseException: user code that raises while a result is unpickled (or in a callback)
  fails that task and never the collector.
- **Faults**: a worker that dies fails the task it was running with WorkerLostError and the
  tasks queued behind it are resent; a worker that dies before it ran anything, several
  times in a row, or an initializer that raises, makes the pool fail its calls with
  InitializerError instead of starting workers forever.

The engine holds no reference to the Pool, so an abandoned Pool is garbage-collected (and its
workers reaped).
"""
from __future__ import annotations

import collections
import itertools
import os
import pickle
import sys
import threading
import traceback
import weakref
from dataclasses import dataclass, field
from time import monotonic as _monotonic
from typing import Any, NamedTuple

from ... import _core, _serialize, _tunables
from ..._cpu import cpu_count
from .. import context as _context
from ..backend import APPLY, MAP, Chunk, Job, Lifecycle, State
from ..results import MapResult
from ..errors import (InitializerError, PoolTerminatedError, TaskCancelledError,
                      TaskTimeoutError, WorkerLostError, describe_exit)
from . import fork, spill, wire, worker

__all__ = ["LocalBackend"]

_my_pid = os.getpid()  # os.getpid() is a system call; this one is kept right across forks


def _forked():
    global _my_pid
    _my_pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


@dataclass(slots=True, eq=False)
class _Task:
    tid: int
    job: Job
    start: int
    count: int
    parts: tuple  # the encoded message (its function named by fid)
    fid: int
    sent_at: float = 0.0
    seg: Any = None  # the spill segment its buffers went through
    budget: float | None = None  # seconds it may run (task_timeout times its items)
    label: str = ""  # what it runs, for the timeout's message
    seq: int = 0  # its number among the tasks sent to its slot (its claim word: seq % CLAIMS)
    streamed: int = 0  # results taken in parts so far (a STREAM chunk's first items)

    def finished(self, obj):
        """The _Finished entry completing this task with ``obj`` (its items after the parts
        already taken)."""
        return _Finished(self.job.result, self.start + self.streamed, self.count - self.streamed,
                         obj, self.job.single)


class _Finished(NamedTuple):
    """A chunk is done: ``obj`` is its result message (unpickled in _complete) or
    (success, value); ``single``: one APPLY task whose value is one item."""

    result: Any
    start: int
    count: int
    obj: Any
    single: bool = False


class _Part(NamedTuple):
    """A part of a STREAM chunk's results: the items from ``start`` (its message, unpickled
    in _complete)."""

    result: Any
    start: int
    msg: Any

    def apply(self, engine):
        value = engine._decode(self.msg)
        if type(value) is list:
            self.result._set_chunk(self.start, len(value), True, value)
        else:  # (False, the exception unpickling raised)
            self.result._set_chunk(self.start, wire.PART_ITEMS, False, value[1])


class _Abort(NamedTuple):
    """Fail the whole result now."""

    result: Any
    err: BaseException

    def apply(self, engine):
        self.result._abort(self.err)


class _Length(NamedTuple):
    """A lazy job's input ended after ``n`` items."""

    result: Any
    n: int

    def apply(self, engine):
        self.result._set_length(self.n)


class _InitFailed(NamedTuple):
    """A worker's message saying its initializer raised."""

    msg: Any

    def apply(self, engine):
        engine._init_failed(self.msg)


@dataclass(slots=True, eq=False)
class _Slot:
    index: int
    proc: Any = None
    inflight: collections.deque = field(default_factory=collections.deque)  # tids, in order
    sent: int = 0  # tasks sent to the current worker
    funcs: set = field(default_factory=set)  # function ids the current worker was sent
    outgoing: collections.deque = field(default_factory=collections.deque)  # [parts, pos, size]
    last_result: float = 0.0
    ready: bool = False  # the current worker said it started (its initializer ran)
    head_since: float = 0.0  # when the oldest task it holds started running (about)
    timed_out: int | None = None  # the task it was killed for running too long
    leaving: bool = False  # it was asked to leave
    seq: int = 0  # tasks dispatched to the slot, ever (numbers their claim words)
    stale: collections.deque = field(default_factory=collections.deque)  # stolen, maybe unread
    gen: int = 0  # workers started for the slot (tags its result segments' words)


class _Retry(Exception):
    pass


#: claim words per slot (see wire: a task's claim); more than a slot ever has unread
CLAIMS = 64
QUEUED, TAKEN, STOLEN = 0, 1, 2


def _check_resources(processes):
    """Refuse a pool that cannot start, before anything is allocated (Pool(10**6))."""
    per_worker = 8 << 20  # a worker's own memory, at least: an interpreter and its rings' pages
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) << 10
    except (OSError, KeyError, ValueError):
        return
    if processes * per_worker > available:
        raise ValueError(
            f"cannot start {processes} worker processes: each needs at least "
            f"{per_worker >> 20} MB and {available >> 20} MB of memory is available")


class LocalBackend:
    """Worker processes on this machine (see the module docstring)."""

    supports_task_timeout = True
    runs_kernels_in_process = True

    def __init__(self, processes, ctx, initializer, initargs, maxtasks, cache):
        _check_resources(processes)
        self.lifecycle = Lifecycle()
        self.processes = self.n = processes
        self.ctx = ctx
        self.start_method = _context.method_name(ctx)
        self.threads = max(1, cpu_count() // processes)  # each worker's share, for kernels
        self.pid = os.getpid()  # a forked copy of this engine must not touch the workers
        self.direct_fork = self.start_method == "fork" and fork.available()
        _context.warn_fork_hazard(self.start_method)
        if self.start_method == "fork":
            inherited, names = _serialize.main_snapshot(), _serialize.names_snapshot()
        else:
            inherited, names = {}, frozenset()
        self.inherited = inherited
        self.pickles = _serialize.FunctionPickles(inherited, names)
        self.fids = {}  # function pickle -> id
        self.fid_pickles = {}  # id -> function pickle
        self.init = None
        if initializer is not None:
            self.init = _serialize.dumps((initializer, tuple(initargs)), inherited, names)
        self.maxtasks = maxtasks
        self.cache = cache
        self.ch = _core.Channel(processes, _tunables.TASK_RING_BYTES,
                                _tunables.RESULT_RING_BYTES)
        self.lock = threading.Lock()
        self.slots = [_Slot(i) for i in range(processes)]
        # The tasks' claim words (stealing a queued task back for an idle worker)
        # (then one word: 1 while big results may come in segments of the workers'; then the
        # words of those segments, RESULT_SEGMENTS_HELD per slot: see spill.ResultSegments)
        words = processes * (CLAIMS + _tunables.RESULT_SEGMENTS_HELD) + 1
        self.claims_seg = _core.Segment(-(-words * 4 // 4096) * 4096)
        self.claims = _core.SharedView(self.claims_seg, 0, "i", words, False)
        self.claims.store(processes * CLAIMS, 1)
        self.results_flag = 1  # that word's value
        self.result_segs = weakref.WeakSet()  # those mapped here that results still use
        self.result_segs_max = _result_segments_max()
        self.stalled = 0  # slots with outgoing messages
        self.tasks = {}  # tid -> _Task
        self.spills = spill.SpillPool(keep=2 * processes + 2)
        self.task_time = 0.0  # moving average of the tasks' service times (seconds)
        self.retry = collections.deque()  # tasks to send first (their worker died)
        self.jobs = []  # lazy jobs still being read
        self.tid = itertools.count()
        self.broken = None  # the error every call fails with once the pool cannot run tasks
        self.early_deaths = 0  # workers in a row that died before completing a task
        self.warm = False  # a worker has answered (before that, callers do not spin)
        self.timed = 0  # tasks in flight that have a budget (task_timeout)
        self.thread = None
        # The workers are started first, while this process has no thread of the pool's own;
        # then the collector starts (it replaces dead workers later, from its own thread:
        # idle in poll(), it holds no lock a forked worker could inherit).
        try:
            with self.lock:
                for slot in self.slots:
                    self._spawn(slot)
        except BaseException:
            self._abandon_start()
            raise
        thread = threading.Thread(target=self._collect, name="pyparallel-collector",
                                  daemon=True)
        thread.start()
        self.thread = thread
        _engines.add(self)

    # ---- workers ----

    def _spawn(self, slot):
        fd, pipe_fd = self.ch.fds
        slot.gen += 1
        p = self.ctx.Process(
            target=worker.main,
            args=(os.getpid(), fd, pipe_fd, slot.index, self.init, self.maxtasks, self.threads,
                  (self.claims_seg.fd, self.claims_seg.ino, self.claims_seg.size, CLAIMS,
                   self.processes, _tunables.RESULT_SEGMENTS_HELD), slot.gen),
            name=f"PyParallelPoolWorker-{slot.index}",
            daemon=True,
        )
        if self.direct_fork:
            p = fork.ForkedProcess(p)
        else:
            with _context.no_main():
                p.start()
        slot.proc = p
        slot.sent = 0
        slot.ready = False
        slot.leaving = False
        slot.funcs = set()
        slot.stale.clear()

    def _abandon_start(self):
        """A worker could not start: stop the ones that did, release everything."""
        procs = [s.proc for s in self.slots if s.proc is not None]
        for p in procs:
            try:
                if hasattr(p, "kill"):
                    p.kill()
                else:
                    p.terminate()
            except (OSError, AttributeError, ValueError):
                pass
        for p in procs:
            try:
                p.join()
            except (OSError, AttributeError, ValueError):
                pass
        for s in self.slots:
            s.proc = None
        self.lifecycle.to(State.TERMINATE)
        self.ch.close()
        self._close_claims()

    def _kill_all(self):
        procs = [s.proc for s in self.slots if s.proc is not None]
        for p in procs:
            if p.exitcode is None:
                try:
                    p.kill()
                except (OSError, AttributeError):
                    pass
        for p in procs:
            p.join(_tunables.KILL_JOIN)
            try:
                p.close()
            except (ValueError, AttributeError):
                pass
        for s in self.slots:
            s.proc = None

    # ---- encoding ----

    def _fid(self, func):
        fb = self.pickles.dumps(func)
        fid = self.fids.get(fb)
        if fid is None:
            fid = self.fids[fb] = len(self.fids)
            self.fid_pickles[fid] = fb
        return fid

    def _dumps(self, obj, buffer_callback=None):
        return _serialize.dumps(obj, self.inherited, self.pickles.skip_names, buffer_callback)

    def _encode(self, job, fid, chunk):
        """A task for ``chunk``; raises what pickling its arguments raises."""
        tid = next(self.tid)
        args = chunk.args
        if job.kind != APPLY and type(args) is not range and type(args) not in wire.PACKED:
            args = wire.pack_args(args)  # a chunk the worker only iterates over (once)
        payload = (fid, args, job.kind)
        # a map's long chunk: its results come in parts (see wire.STREAM); an imap's do not,
        # as it must not hand out the items of a chunk that fails later
        flags = (wire.STREAM if chunk.count > wire.PART_ITEMS and job.kind != APPLY
                 and type(job.result) is MapResult else 0)
        try:
            parts = wire.encode(tid, payload, flags=flags)
            if not self.inherited and b"__main__" in parts[1]:
                raise _Retry  # objects of __main__: by value for a worker that lacks them
        except (pickle.PicklingError, AttributeError, TypeError, _Retry):
            parts = wire.encode(tid, payload, dumps=self._dumps, flags=flags)
        task = _Task(tid, job, chunk.start, chunk.count, parts, fid)
        if job.timeout is not None:
            task.budget = job.timeout * chunk.count
            task.label = _describe_call(job, chunk)
        return task

    # ---- scheduling (self.lock held) ----

    def _next_task(self, done):
        if self.retry:
            return self.retry.popleft()
        i = 0
        while i < len(self.jobs):
            job = self.jobs[i]
            result = job.result
            if job.cancelled:
                del self.jobs[i]
                continue
            if type(job) is _Eager:
                if job.tasks:
                    return job.tasks.popleft()
                del self.jobs[i]
                continue
            if job.ahead and result._issued - result._taken >= job.ahead:
                result._waker = self.kick  # imap: the caller is behind; wait for it
                if result._issued - result._taken >= job.ahead:
                    i += 1
                    continue
                result._waker = None
            try:
                item = next(job.chunks)
            except StopIteration:
                del self.jobs[i]
                done.append(_Length(result, job.extra.get("items", 0)))
                continue
            if isinstance(item, BaseException):  # the input iterator raised: that item fails
                start = job.extra.get("items", 0)
                job.extra["items"] = start + 1
                done.append(_Finished(result, start, 1, (False, item)))
                continue
            job.extra["items"] = item.start + item.count
            result._issued += item.count
            try:
                return self._encode(job, job.extra["fid"], item)
            except Exception as e:  # noqa: BLE001 - that item cannot be sent: it fails
                done.append(_Finished(result, item.start, item.count, (False, e)))
        return None

    def _pump(self, done):
        """Write what fits: stalled messages first, then new tasks to the least busy slots."""
        if self.broken is not None:
            self._fail_everything(self.broken, done)
            return
        written = []
        try:
            if not self.jobs and not self.retry and self.stalled == 0:
                self._steal(written)
            else:
                self._write_tasks(done, written)
        finally:
            for i in written:  # wake the workers only once everything is written
                self.ch.wake(i)

    def _flush(self, slot):
        """Writes the slot's outgoing messages while they fit; True when none is left."""
        out = slot.outgoing
        while out:
            msg = out[0]
            msg[1] = self.ch.put(slot.index, msg[0], msg[1], False)
            if msg[1] != msg[2]:
                return False
            out.popleft()
        self.stalled -= 1
        return True

    def _write_tasks(self, done, written):
        for slot in self.slots:
            if slot.outgoing:
                self._flush(slot)
                written.append(slot.index)
        while True:
            slot = self._free_slot()
            if slot is None:
                return
            task = self._next_task(done)
            if task is None:
                break
            self._dispatch(slot, task)
            if slot.index not in written:
                written.append(slot.index)
        self._steal(written)

    def _withdraw(self, slot, task):
        """Takes back ``task``, queued on ``slot``'s worker behind the one it runs (the worker
        will skip it); False if the worker has just started it (the claim word decides)."""
        word = slot.index * CLAIMS + task.seq % CLAIMS
        if not self.claims.compare_exchange(word, QUEUED, STOLEN):
            return False
        slot.inflight.remove(task.tid)
        slot.sent -= 1
        i = len(slot.stale)
        while i and slot.stale[i - 1] > task.seq:  # kept in order (_on_message drops the head)
            i -= 1
        slot.stale.insert(i, task.seq)
        del self.tasks[task.tid]
        if task.seg is not None:  # the worker skips the message without mapping it
            self.spills.give(task.seg, worker_gone=True)
            task.seg = None
        if task.budget is not None:
            self.timed -= 1
        return True

    def _steal(self, written):
        """Nothing new to send: an idle worker takes the newest task queued behind a running
        one on another worker, rather than let it wait there (head-of-line blocking). The
        claim word decides a race with that worker starting it: whoever moves it first."""
        if len(self.tasks) < 2:  # nothing queued behind anything (a round trip, say)
            return
        maxtasks = self.maxtasks
        while True:
            idle = None
            for slot in self.slots:
                if (not slot.inflight and slot.proc is not None and not slot.outgoing
                        and not slot.leaving and (maxtasks is None or slot.sent < maxtasks)):
                    idle = slot
                    break
            if idle is None:
                return
            victim = None
            for slot in self.slots:  # the one whose running task started first
                if (len(slot.inflight) > 1 and not slot.outgoing and slot.proc is not None
                        and (victim is None or slot.head_since < victim.head_since)):
                    victim = slot
            if victim is None:
                return
            task = self.tasks[victim.inflight[-1]]
            if not self._withdraw(victim, task):
                return  # the worker has just started it (so its previous task is done)
            self._dispatch(idle, task)
            if idle.index not in written:
                written.append(idle.index)

    def _free_slot(self):
        """The slot with the fewest tasks in flight among those that may take one more."""
        window = 1 if self.task_time > _tunables.LONG_TASK else _tunables.WINDOW
        best, fewest = None, window
        maxtasks = self.maxtasks
        for slot in self.slots:
            k = len(slot.inflight)
            if (k < fewest and slot.proc is not None and not slot.outgoing and not slot.leaving
                    and (maxtasks is None or slot.sent < maxtasks)
                    and k + len(slot.stale) < CLAIMS - 1):
                best, fewest = slot, k
        return best

    def _send(self, slot, parts):
        if slot.outgoing:
            slot.outgoing.append([parts, 0, wire.parts_size(parts)])
            return
        size = wire.parts_size(parts)
        pos = self.ch.put(slot.index, parts, 0, False)
        if pos != size:
            slot.outgoing.append([parts, pos, size])
            self.stalled += 1

    def _dispatch(self, slot, task):
        """Writes a task into the slot's ring (the rest later, if it does not fit now)."""
        if task.fid not in slot.funcs:
            slot.funcs.add(task.fid)
            self._send(slot, wire.encode_define(task.fid, self.fid_pickles[task.fid]))
        if not self.results_flag:  # results the caller let go of may have freed some
            self._results_ok()
        task.seq = seq = slot.seq
        slot.seq = seq + 1
        claim = seq % CLAIMS
        self.claims.store(slot.index * CLAIMS + claim, QUEUED)
        msg, task.seg = self.spills.spill(wire.with_claim(task.parts, claim))
        task.sent_at = _monotonic()
        self.tasks[task.tid] = task
        if not slot.inflight:
            slot.head_since = task.sent_at
        if task.budget is not None:
            self.timed += 1
            self.ch.notify()  # the collector now has a deadline to watch
        slot.inflight.append(task.tid)
        slot.sent += 1
        self._send(slot, msg)

    def _fail_everything(self, err, done):
        """Every pending result fails with err (the pool cannot run tasks any more)."""
        for slot in self.slots:
            slot.inflight.clear()
            if slot.outgoing:
                slot.outgoing.clear()
        self.stalled = 0
        self._drop_tasks()
        self.retry.clear()
        self.jobs.clear()
        for result in list(self.cache.values()):
            done.append(_Abort(result, err))

    def _on_message(self, slot, msg, done):
        """Accounts for a result message; its unpickling is left to _complete, outside the
        lock, so that the next tasks are written first and the workers do not wait for it."""
        tid = wire.peek_tid(msg)
        if tid == wire.READY_TID:
            slot.ready = True
            self.early_deaths = 0
            slot.head_since = _monotonic()  # a task's budget starts once its worker is up
            return
        if tid == wire.INIT_FAILED_TID:
            done.append(_InitFailed(msg))
            self.broken = InitializerError("the pool's initializer raised in a worker")
            return
        flags = wire.peek(msg)[1]
        if flags & wire.PARTIAL:
            task = self.tasks.get(tid)
            if task is None or task.job.cancelled:
                return
            at = (flags >> wire.CLAIM_SHIFT) * wire.PART_ITEMS
            if at != task.streamed:  # a part that a re-run of the task sends again
                return
            task.streamed = at + wire.PART_ITEMS
            done.append(_Part(task.job.result, task.start + at, msg))
            return
        task = self.tasks.pop(tid, None)
        if task is None:
            return
        self.warm = True
        stale = slot.stale
        while stale and stale[0] < task.seq:  # read (and skipped) before this one ran
            stale.popleft()
        dq = slot.inflight
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
        dt = now - max(task.sent_at, slot.last_result)
        slot.last_result = now
        slot.head_since = now  # the next task it holds starts about now
        if task.budget is not None:
            self.timed -= 1
        self.task_time += 0.3 * (dt - self.task_time)
        if task.seg is not None:
            self.spills.give(task.seg)
        if flags & wire.SPILLED:
            # Its buffers are in a segment of the worker's: map it now (the worker waits for
            # that before it exits), and give it back once the results let go of it.
            word = (self.processes * CLAIMS + 1 + slot.index * _tunables.RESULT_SEGMENTS_HELD
                    + (flags >> wire.CLAIM_SHIFT) - 1)
            tag = slot.gen * 4
            try:
                fd, ino, size = wire.spill_ref(msg)
                seg = _core.Segment.attach(slot.proc.pid, fd, ino, size)
            except OSError as e:
                self.claims.compare_exchange(word, tag + spill.R_SENT, spill.R_FREE)
                msg = (False, OSError(e.errno, f"the task's result could not be mapped from "
                                               f"its worker's shared segment: {e.strerror}"))
            else:
                self.claims.compare_exchange(word, tag + spill.R_SENT, tag + spill.R_MAPPED)
                weakref.finalize(seg, _result_freed, weakref.ref(self), word,
                                 tag + spill.R_MAPPED)
                msg = _MappedResult(msg, seg)
                self.result_segs.add(seg)
            self._results_ok()
        elif self.result_segs or not self.results_flag:
            self._results_ok()
        if task.job.cancelled:
            return
        done.append(task.finished(msg))

    def _results_ok(self):
        """Tells the workers whether big results may come in segments (not while too many
        of those are alive here: each holds a file descriptor)."""
        ok = int(len(self.result_segs) < self.result_segs_max)
        if self.results_flag != ok:
            self.results_flag = ok
            self.claims.store(self.processes * CLAIMS, ok)

    def _drain_all(self, done):
        """Takes every slot's results (self.lock held); False once the pool is terminated."""
        if self.lifecycle.state is State.TERMINATE:
            return False
        for slot in self.slots:
            if slot.proc is not None:
                self._drain(slot, done)
        return True

    def _drain(self, slot, done):
        get = self.ch.get
        i = slot.index
        while True:
            msg = get(i)
            if msg is None:
                return
            self._on_message(slot, msg, done)

    def _reap(self, slot, done, resend_all=False):
        """The slot's worker has exited: account for its tasks, replace it if needed.
        ``resend_all``: it was killed to cancel a job; every other job's task is resent."""
        p = slot.proc
        self._drain(slot, done)
        p.join(1)
        code = p.exitcode
        held = slot.inflight
        if held and slot.ready and not resend_all:
            # Results come back in order, so the oldest task is the one it was running.
            task = self.tasks.pop(held.popleft())
            if task.seg is not None:
                self.spills.give(task.seg, worker_gone=True)
            if task.budget is not None:
                self.timed -= 1
            if not task.job.cancelled:
                if slot.timed_out == task.tid:
                    err = TaskTimeoutError(_timeout_message(task))
                else:
                    err = WorkerLostError(describe_exit(p.pid, code) + " while running a task")
                done.append(task.finished((False, err)))
        slot.timed_out = None
        while held:  # never started (or cancelled): send them again
            task = self.tasks.pop(held.pop())
            if task.budget is not None:
                self.timed -= 1
            if task.seg is not None:
                self.spills.give(task.seg, worker_gone=True)
                task.seg = None
            if not task.job.cancelled:
                self.retry.appendleft(task)
        if slot.outgoing:
            slot.outgoing.clear()
            self.stalled -= 1
        if not slot.ready and not resend_all and not slot.leaving:
            # It died before it could run anything: in the initializer, or starting up.
            self.early_deaths += 1
            if self.early_deaths >= _tunables.MAX_EARLY_DEATHS and self.broken is None:
                what = "in the pool's initializer" if self.init is not None else "starting up"
                self.broken = InitializerError(
                    f"{self.early_deaths} worker processes in a row died {what} (the last: "
                    f"{describe_exit(p.pid, code)}); the pool stops starting workers")
        try:
            p.close()
        except (ValueError, AttributeError):
            pass
        slot.proc = None
        self.ch.reset(slot.index)
        if (self.broken is None and self.lifecycle.state is State.RUN) or (
                self.broken is None and self.lifecycle.state is State.CLOSE and not self._idle()):
            self._spawn(slot)

    def _idle(self):
        return not self.tasks and not self.retry and not self.jobs

    def _drop_tasks(self):
        """Forget every task in flight (the pool failed or was terminated)."""
        for task in self.tasks.values():
            if task.seg is not None:
                spill.evict(task.seg)
        self.tasks.clear()
        self.timed = 0

    def _expire(self):
        """Kill the workers whose running task is over its budget; seconds until the next
        budget runs out (or SAFETY_WAIT)."""
        wait = _tunables.SAFETY_WAIT
        if not self.timed:
            return wait
        now = _monotonic()
        for slot in self.slots:
            if not slot.inflight or slot.proc is None or slot.timed_out is not None:
                continue
            if not slot.ready:  # still starting (spawn, forkserver) or in the initializer
                continue
            task = self.tasks.get(slot.inflight[0])
            if task is None or task.budget is None:
                continue
            left = slot.head_since + task.budget - now
            if left <= 0:
                slot.timed_out = task.tid
                try:
                    slot.proc.kill()
                except (OSError, AttributeError):
                    pass
            else:
                wait = min(wait, left)
        return max(wait, 0.001)

    def _leave_if_done(self):
        """Closed and idle: ask every worker to leave (once). True once they were asked."""
        if self.lifecycle.state is not State.CLOSE or not self._idle():
            return False
        for slot in self.slots:
            if slot.proc is not None and not slot.leaving:
                slot.leaving = True
                self._send(slot, ())  # an empty message: leave
                self.ch.wake(slot.index)
        return True

    # ---- completing results (outside the lock) ----

    def _complete(self, done):
        """Completes results: the entries are _Finished chunks (their message still to be
        unpickled, or (success, value)), _Abort, _Length and _InitFailed. User code runs here
        (unpickling, callbacks): whatever it raises fails that result, never the caller of
        _complete."""
        for entry in done:
            if type(entry) is not _Finished:
                try:
                    entry.apply(self)
                except BaseException:  # noqa: BLE001 - a callback of the aborted result
                    traceback.print_exc()
                continue
            result, start, count, obj, single = entry
            try:
                if type(obj) is bytearray:
                    obj = self._decode(obj)
                elif type(obj) is _MappedResult:
                    obj = self._decode(obj.msg, obj)
                success, value = obj
                if success and single and count == 1 and not isinstance(result, _ApplyResult):
                    value = [value]  # an imap with chunksize 1: one item
                result._set_chunk(start, count, success, value)
            except _ResultCompletedTwice:  # a bug of this engine: say so, go on
                traceback.print_exc()
            except BaseException as e:  # noqa: BLE001 - see the docstring
                try:
                    result._abort(e)
                except BaseException:  # noqa: BLE001
                    traceback.print_exc()
        done.clear()

    def _decode(self, msg, mapped=None):
        try:
            return wire.decode(msg, None, mapped)[1]
        except BaseException as e:  # noqa: BLE001 - a result that cannot be unpickled here
            return (False, e)

    def _init_failed(self, msg):
        obj = self._decode(msg)
        cause = obj if isinstance(obj, BaseException) else None
        if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], BaseException):
            cause = obj[1]
        err = self.broken
        if err is not None and err.__cause__ is None:
            err.args = (f"the pool's initializer raised in a worker: {cause!r}",)
            err.__cause__ = cause

    # ---- the collector thread ----

    def _collect(self):
        try:
            self._collect_loop()
        except BaseException:  # pragma: no cover - a bug: do not leave callers waiting
            traceback.print_exc()
            self.lifecycle.to(State.TERMINATE)
            done = []
            with self.lock:
                self._fail_everything(PoolTerminatedError("pyparallel pool collector failed"),
                                      done)
            self._complete(done)
            self._kill_all()
        if self.lifecycle.state is State.TERMINATE and self.pid == _my_pid:
            self._release()

    def _collect_loop(self):
        ch = self.ch
        done = []
        wait = _tunables.SAFETY_WAIT
        while True:
            sentinels = [s.proc.sentinel for s in self.slots if s.proc is not None]
            ch.wait(sentinels, wait)
            finished = False
            with self.lock:
                if not self._drain_all(done):
                    return
                wait = self._expire()
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.exitcode is not None:
                        self._reap(slot, done)
                if self.broken is not None:
                    self._fail_everything(self.broken, done)
                else:
                    self._pump(done)
                if self._leave_if_done():
                    if all(s.proc is None or s.proc.exitcode is not None for s in self.slots):
                        for slot in self.slots:
                            if slot.proc is not None:
                                self._reap(slot, done)
                        finished = True
            self._complete(done)  # clears done: no result stays referenced while we sleep
            if finished:
                return

    # ---- the Backend protocol ----

    def _check_running(self):
        if self.lifecycle.state is not State.RUN:
            raise ValueError("Pool not running")
        if self.pid != _my_pid:
            raise ValueError("Pool not running: it belongs to the process that created it")

    def submit(self, job: Job) -> None:
        self._check_running()
        job.extra["fid"] = fid = self._fid(job.func)
        if job.lazy:
            done = []
            with self.lock:
                self._check_running()
                self.jobs.append(job)
                self._pump(done)
            self._complete(done)
            return
        tasks = [self._encode(job, fid, c) for c in job.chunks]  # raises before any is sent
        done = []
        with self.lock:
            self._check_running()
            if len(tasks) == 1 and not (self.retry or self.jobs or self.stalled
                                        or self.broken is not None):
                slot = self._free_slot()
                if slot is not None:  # apply_async: straight to the least busy worker
                    self._dispatch(slot, tasks[0])
                    self.ch.wake(slot.index)
                    return
            self.jobs.append(_Eager(job, tasks))
            self._pump(done)
        self._complete(done)

    @staticmethod
    def pack_chunk(seq, start, stop):
        """A map chunk's arguments, ``seq[start:stop]`` of a list or tuple: packed at once
        when they are plain numbers or records (a snapshot, read in place), else a tuple."""
        return wire.pack_args(seq, start, stop)

    def help(self, result) -> None:
        """Before blocking on a result: collect it ourselves if it comes within SPIN_US,
        saving the collector's wakeup and ours (tens of microseconds each on a busy machine)."""
        if (not self.warm or self.task_time > _tunables.NO_SPIN_TASK
                or self.lifecycle.state is State.TERMINATE):
            # No use spinning for workers that never answered yet (still starting) or for
            # tasks that take far longer than the spin: it would only keep a CPU busy.
            return
        try:
            if self.ch.spin(_tunables.SPIN_US, _tunables.LEASE_US):
                self.collect_now()
        except ValueError:  # the channel was closed meanwhile
            pass

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
        try:
            self.ch.notify()
        except ValueError:
            pass

    def cancel(self, result) -> None:
        """Ctrl-C in a caller waiting for ``result``: drop its job, replace the workers
        running its tasks, fail it with TaskCancelledError; the pool stays usable."""
        self.cancel_all((result,))

    def cancel_all(self, results, error=None, stop="kill") -> None:
        """Drops the jobs of ``results`` (their tasks queued behind another job's task on a
        worker are taken back), stops the workers running their tasks (``stop``: "kill",
        SIGKILL; "terminate", SIGTERM, then SIGKILL to one still there after KILL_JOIN) and
        replaces them, fails each with ``error(exits)`` (``exits``: (pid, exit code) of the
        workers that were running it, empty when none had started it), TaskCancelledError by
        default. Other jobs are not disturbed; the pool stays usable."""
        if self.pid != _my_pid or self.lifecycle.state is State.TERMINATE:
            return
        ids = {id(r) for r in results}
        done = []
        exits = {}  # id(result) -> [(pid, exit code)] of the workers that ran it
        with self.lock:
            for job in self.jobs:
                if id(job.result) in ids:
                    job.cancelled = True
            self.retry = collections.deque(t for t in self.retry if id(t.job.result) not in ids)
            victims = {}  # slot index -> (slot, the result it runs)
            for slot in self.slots:
                if slot.proc is None:
                    continue
                for tid in list(slot.inflight):
                    task = self.tasks[tid]
                    if id(task.job.result) not in ids:
                        continue
                    task.job.cancelled = True
                    # results come back in order: the oldest task is the one it runs
                    if slot.inflight[0] == tid or not self._withdraw(slot, task):
                        # its claim word says whether the worker took it (the READY message
                        # may not have been read yet)
                        word = slot.index * CLAIMS + task.seq % CLAIMS
                        started = self.claims.load(word) == TAKEN
                        victims[slot.index] = (slot, task.job.result if started else None)
            for slot, _ in victims.values():
                try:
                    slot.proc.terminate() if stop == "terminate" else slot.proc.kill()
                except (OSError, AttributeError):
                    pass
            for slot, ran in victims.values():
                slot.proc.join(_tunables.KILL_JOIN)
                if slot.proc.exitcode is None:  # it outlived SIGTERM
                    try:
                        slot.proc.kill()
                    except (OSError, AttributeError):
                        pass
                    slot.proc.join(_tunables.KILL_JOIN)
                if ran is not None:
                    exits.setdefault(id(ran), []).append((slot.proc.pid, slot.proc.exitcode))
                self._reap(slot, done, resend_all=True)
            self._pump(done)
            for result in results:
                err = TaskCancelledError("the call was interrupted (KeyboardInterrupt)") \
                    if error is None else error(exits.get(id(result), []))
                done.append(_Abort(result, err))
        self._complete(done)
        self.kick()

    def close(self) -> None:
        if self.lifecycle.to(State.CLOSE):
            with self.lock:
                for job in self.jobs:  # nobody may read further: feed the rest unthrottled
                    job.ahead = 0
                    waker = getattr(job.result, "_waker", None)
                    if waker is not None:
                        job.result._waker = None
                self._leave_if_done()  # idle: the workers start leaving now
        self.kick()

    def terminate(self) -> None:
        if _my_pid != self.pid:
            return
        if not self.lifecycle.to(State.TERMINATE):
            return
        self.kick()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(_tunables.KILL_JOIN)
        self._kill_all()
        err = PoolTerminatedError("the pool was terminated before the task completed")
        for result in list(self.cache.values()):
            result._abort(err)
        with self.lock:
            self._drop_tasks()
            self.jobs.clear()
            self.retry.clear()
        if self.thread is None or not self.thread.is_alive():
            self._release()
        # else: the collector itself is terminating (from a callback); it releases on its
        # way out

    def _release(self):
        """The workers are gone: unmap the channel, close the spill segments."""
        with self.lock:
            self.spills.close()
        self.ch.close()
        self._close_claims()

    def _close_claims(self):
        self.claims = None  # the view holds a buffer of the segment
        try:
            self.claims_seg.close()
        except BufferError:  # pragma: no cover - a view is still referenced somewhere
            pass

    def join(self) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        if self.lifecycle.state is State.TERMINATE:
            self._kill_all()
        else:
            for slot in self.slots:
                if slot.proc is not None:
                    slot.proc.join()
            for slot in self.slots:
                slot.proc = None
        self._release()

    def workers(self) -> list:
        return [s.proc for s in self.slots if s.proc is not None]

    def repopulate(self) -> None:
        """Replace the workers that exited (the collector does it too, on its next turn)."""
        done = []
        with self.lock:
            if self.lifecycle.state is not State.RUN:
                return
            for slot in self.slots:
                if slot.proc is not None and slot.proc.exitcode is not None:
                    self._reap(slot, done)
                elif slot.proc is None and self.broken is None:
                    self._spawn(slot)
            self._pump(done)
        self._complete(done)
        self.kick()


class _MappedResult:
    """A result message whose buffers are in a segment already mapped here; decoding it
    "attaches" that segment (see wire.decode's cache)."""

    __slots__ = ("msg", "seg")

    def __init__(self, msg, seg):
        self.msg = msg
        self.seg = seg

    def attach(self, pid, fd, ino, size):
        seg, self.seg = self.seg, None
        return seg

    def release(self, seg):
        seg.close()


def _result_freed(engine_ref, word, tag):
    """The last view of a result segment is gone: its worker may write it again.

    Only in the engine's own process: a child forked from it holds copies of the same views
    (and runs this finalizer at its exit), while the parent's views still read the segment.
    os.getpid(), not _my_pid: a child forked without the at-fork handlers must not pass."""
    eng = engine_ref()
    if eng is None or eng.pid != os.getpid():
        return
    claims = eng.claims
    if claims is not None:
        claims.compare_exchange(word, tag, spill.R_FREE)


def _result_segments_max():
    import resource

    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(0, min(_tunables.RESULT_SEGMENTS_MAX, soft // 4))


def _describe_call(job, chunk):
    name = getattr(job.func, "__qualname__", None) or repr(job.func)
    if chunk.count != 1:
        return name
    import reprlib

    if job.kind == APPLY:
        args, kwds = chunk.args
        inner = ", ".join([reprlib.repr(a) for a in args]
                          + [f"{k}={reprlib.repr(v)}" for k, v in kwds.items()])
    elif job.kind == MAP:
        inner = reprlib.repr(chunk.args[0])
    else:
        inner = ", ".join(reprlib.repr(a) for a in chunk.args[0])
    return f"{name}({inner})"


def _timeout_message(task):
    budget = task.budget
    if task.count == 1:
        what = f"task {task.start} of the call, {task.label},"
    else:
        what = (f"a chunk of tasks {task.start}..{task.start + task.count - 1} of the call "
                f"({task.count} tasks of {task.label})")
    return (f"{what} ran longer than its task_timeout ({budget:g} s); its worker was killed "
            "and replaced")


class _Eager:
    """A job whose tasks were all encoded at submission, fed like a lazy one."""

    __slots__ = ("job", "tasks", "result", "ahead", "extra")

    def __init__(self, job, tasks):
        self.job = job
        self.result = job.result
        self.tasks = collections.deque(tasks)
        self.ahead = 0
        self.extra = job.extra

    @property
    def cancelled(self):
        return self.job.cancelled

    @cancelled.setter
    def cancelled(self, value):
        self.job.cancelled = value


from ..results import ApplyResult as _ApplyResult  # noqa: E402
from ..results import ResultCompletedTwice as _ResultCompletedTwice  # noqa: E402

_engines = weakref.WeakSet()


def _terminate_all():  # interpreter exit reaps every worker
    for eng in list(_engines):
        try:
            eng.terminate()
        except Exception:  # noqa: BLE001
            pass


import atexit  # noqa: E402

atexit.register(_terminate_all)
