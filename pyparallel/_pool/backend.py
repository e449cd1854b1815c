"""The seam between :class:`pyparallel.Pool` and the engines that run its tasks.

``Pool`` checks arguments, chooses chunks, runs native kernels itself, and hands everything
else to a **backend** as :class:`Job` records. The local shared-memory engine
(:mod:`pyparallel._pool.local.engine`) is the first backend; a distributed one is a new module
that implements the same protocol, not a change to Pool.

What a backend must guarantee:

- **Submission** (``submit(job)``): a job whose ``lazy`` is False has all its chunks encoded
  before anything is sent, so an argument that cannot be pickled raises in the caller and
  nothing runs; a lazy job (imap) is read as workers free up, at most ``job.ahead`` items
  beyond what the caller has taken (``result._issued``/``_taken``; set ``result._waker`` to be
  called when the caller takes one), and an item that cannot be encoded (or an input iterator
  that raises) fails that item only. After the last item, ``result._set_length(n)``.
- **Completion**: every chunk of every job completes its result exactly once, through
  ``result._set_chunk`` / ``result._abort`` (see :mod:`.results`), with the task's own
  exception (its remote traceback as ``__cause__``) on failure. A worker lost mid-task fails
  that task with :class:`~.errors.WorkerLostError` (or is retried, where the engine can say
  so safely) and the rest goes on. Callbacks run in the backend's threads; they may call
  ``terminate()``.
- **Order**: none between chunks; results place themselves by ``Chunk.start``.
- **Cancellation** (``cancel(result)``, Ctrl-C in the caller): the job's chunks not yet started
  are dropped, the workers running its chunks are replaced, its result fails with
  :class:`~.errors.TaskCancelledError`, other jobs are not disturbed, the pool stays RUN.
  ``cancel_all(results, error, stop)`` does it for several at once (an executor's
  ``terminate_workers``/``kill_workers``): each fails with ``error(exits)``, the exits of
  the workers that were running it, and ``stop="terminate"`` stops those with SIGTERM.
- **Life cycle**: one :class:`Lifecycle` (RUN -> CLOSE -> TERMINATE, or RUN -> TERMINATE),
  owned by the backend and read by the Pool. ``close()``: no new jobs; workers leave once the
  jobs are done. ``terminate()``: stop now; every pending result fails with
  :class:`~.errors.PoolTerminatedError`. ``join()``: wait for the workers (after either). A
  job submitted outside RUN raises ValueError("Pool not running").
- **Native kernels**: a backend whose ``runs_kernels_in_process`` is true has Pool run
  kernels on threads in the calling process (the local engine: no pickling); for the others
  Pool sends BULK jobs, so each worker runs its chunks through the kernel's bulk path.
- **Introspection**: ``processes`` (tasks that run at once), ``start_method`` (or None),
  ``workers()`` (process-like objects with ``pid``, ``is_alive()``, ``exitcode``), and
  ``repopulate()`` (replace exited workers now).
- ``help(result)``: called by a caller about to block on ``result``; may collect results in
  the caller's thread (a no-op is fine).
- **Timeouts** (``job.timeout``, seconds per item; a chunk's budget is its length times it):
  a backend whose ``supports_task_timeout`` is true fails a task that runs longer with
  :class:`~.errors.TaskTimeoutError` naming it, replaces its worker, and goes on; Pool refuses
  ``task_timeout`` for a backend without it.
"""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

__all__ = ["State", "Lifecycle", "Chunk", "Job", "Backend", "APPLY", "MAP", "STARMAP", "BULK"]

#: the kinds of task: func(*args, **kwds); a chunk of map; a chunk of starmap; a chunk given
#: whole to func, which returns the chunk's list of results (native kernels' bulk path)
APPLY, MAP, STARMAP, BULK = 0, 1, 2, 3


class State(str, enum.Enum):
    """A pool's state; equal to multiprocessing.pool's RUN, CLOSE and TERMINATE strings."""

    RUN = "RUN"
    CLOSE = "CLOSE"
    TERMINATE = "TERMINATE"

    def __str__(self):
        return self.value


_ALLOWED = {
    State.RUN: (State.CLOSE, State.TERMINATE),
    State.CLOSE: (State.TERMINATE,),
    State.TERMINATE: (),
}


class Lifecycle:
    """The one state machine of a pool: :meth:`to` is the only way to change the state."""

    __slots__ = ("state", "_lock")

    def __init__(self):
        self.state = State.RUN
        self._lock = threading.Lock()

    def to(self, new: State) -> bool:
        """Moves to ``new`` if that is a step forward; False when it was not (already there,
        or past it): closing a terminated pool is not an error, and changes nothing."""
        with self._lock:
            if new in _ALLOWED[self.state]:
                self.state = new
                return True
            return False

    @property
    def running(self) -> bool:
        return self.state is State.RUN


@dataclass(slots=True)
class Chunk:
    """Items ``start .. start+count-1`` of a call: ``args`` is the chunk's items (MAP,
    STARMAP: a tuple, a range, or what the backend's optional ``pack_chunk(seq, start,
    stop)`` made of a list's or tuple's items) or ``(args, kwds)`` (APPLY, count 1)."""

    start: int
    count: int
    args: Any


@dataclass(slots=True, eq=False)
class Job:
    """One call: a function, a kind, the chunks (a list, or an iterator when lazy) and the
    result object they complete. ``single``: each chunk is one APPLY task whose value is one
    item (apply, and imap with chunksize 1)."""

    result: Any
    func: Callable
    kind: int
    chunks: Any  # list[Chunk] or Iterator[Chunk | BaseException]
    lazy: bool = False
    single: bool = False
    ahead: int = 0  # lazy: items beyond the caller's allowed in flight (0: no bound)
    timeout: float | None = None  # seconds per item (task_timeout), or None
    cancelled: bool = False
    extra: dict = field(default_factory=dict)  # a backend's own bookkeeping


class Backend(Protocol):
    """What Pool needs of an engine (see the module docstring for the guarantees)."""

    lifecycle: Lifecycle
    processes: int
    start_method: str | None

    def submit(self, job: Job) -> None: ...
    def help(self, result: Any) -> None: ...
    def cancel(self, result: Any) -> None: ...
    def cancel_all(self, results: Any, error: Any = None, stop: str = "kill") -> None: ...
    def close(self) -> None: ...
    def terminate(self) -> None: ...
    def join(self) -> None: ...
    def workers(self) -> list: ...
    def repopulate(self) -> None: ...


def chunk_source(items: Iterator, chunksize: int, single: bool) -> Iterator:
    """Lazy chunks of ``items`` (imap): Chunk records, and an exception where the input
    iterator raised (it ends the source)."""
    start = 0
    it = iter(items)
    try:
        if single:
            for x in it:
                yield Chunk(start, 1, ((x,), {}))
                start += 1
        else:
            import itertools

            while True:
                batch = tuple(itertools.islice(it, chunksize))
                if not batch:
                    return
                yield Chunk(start, len(batch), batch)
                start += len(batch)
    except Exception as e:  # noqa: BLE001 - the caller's iterator failed: that item fails
        yield e
