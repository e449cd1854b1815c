"""The exceptions a pool raises (re-exported by :mod:`pyparallel.pool`)."""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool as _mpp
import signal

__all__ = [
    "TimeoutError", "RemoteTraceback", "MaybeEncodingError", "WorkerLostError",
    "InitializerError", "PoolTerminatedError", "TaskCancelledError", "TaskTimeoutError",
    "describe_exit",
]

_BuiltinTimeoutError = TimeoutError
TimeoutError = multiprocessing.TimeoutError
RemoteTraceback = _mpp.RemoteTraceback
MaybeEncodingError = _mpp.MaybeEncodingError

#: exitcode of a child whose exit status someone else collected (no real code is 256)
UNKNOWN_EXIT = 256


class WorkerLostError(multiprocessing.ProcessError):
    """A worker process died while it held the task; the pool replaced it."""


class InitializerError(multiprocessing.ProcessError):
    """The pool's initializer failed in a worker (it raised, or the worker died in it): the
    pool cannot run tasks."""


class PoolTerminatedError(multiprocessing.ProcessError):
    """The pool was terminated before the task completed."""


class TaskTimeoutError(multiprocessing.TimeoutError, _BuiltinTimeoutError):
    """A task ran longer than its ``task_timeout``: its worker was killed and replaced, the
    other tasks went on."""


class TaskCancelledError(multiprocessing.ProcessError):
    """The call was interrupted (KeyboardInterrupt) before this task completed; the pool
    cancelled the call's remaining tasks and goes on."""


def describe_exit(pid, code) -> str:
    """'worker process 123 was killed by SIGKILL' and the like."""
    if code is None or code == UNKNOWN_EXIT:
        return f"worker process {pid} died"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker process {pid} was killed by {name}"
    return f"worker process {pid} exited with code {code}"
