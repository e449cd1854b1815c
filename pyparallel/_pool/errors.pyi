# Type stubs for pyparallel._pool.errors (re-exported by pyparallel.pool).
import multiprocessing
import builtins

__all__ = [
    "TimeoutError", "RemoteTraceback", "MaybeEncodingError", "WorkerLostError",
    "InitializerError", "PoolTerminatedError", "TaskCancelledError", "TaskTimeoutError",
    "describe_exit",
]

TimeoutError = multiprocessing.TimeoutError

# multiprocessing.pool's own classes (typeshed leaves them out)
class RemoteTraceback(Exception):
    tb: str
    def __init__(self, tb: str) -> None: ...

class MaybeEncodingError(Exception):
    exc: str
    value: str
    def __init__(self, exc: BaseException, value: object) -> None: ...

UNKNOWN_EXIT: int

class WorkerLostError(multiprocessing.ProcessError): ...
class InitializerError(multiprocessing.ProcessError): ...
class PoolTerminatedError(multiprocessing.ProcessError): ...
class TaskTimeoutError(multiprocessing.TimeoutError, builtins.TimeoutError): ...
class TaskCancelledError(multiprocessing.ProcessError): ...

def describe_exit(pid: int, code: int | None) -> str: ...
