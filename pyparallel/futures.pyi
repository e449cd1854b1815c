# Type stubs for pyparallel.futures: a concurrent.futures executor on pyparallel's workers.
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import _base
from concurrent.futures.process import BrokenProcessPool as BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

from typing_extensions import ParamSpec

from ._pool.errors import InitializerError, WorkerLostError

__all__ = ["ProcessPoolExecutor", "BrokenWorkerError", "InitializerFailedError",
           "BrokenProcessPool"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

class BrokenWorkerError(BrokenProcessPool, WorkerLostError): ...
class InitializerFailedError(BrokenProcessPool, InitializerError): ...

class Future(_base.Future[_T]): ...

class ProcessPoolExecutor(_base.Executor):
    def __init__(self, max_workers: int | None = None,
                 mp_context: str | BaseContext | None = None,
                 initializer: Callable[..., object] | None = None,
                 initargs: Iterable[Any] = (), *, max_tasks_per_child: int | None = None,
                 reuse: bool = True) -> None: ...
    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> Future[_T]: ...
    def map(self, fn: Callable[..., _T], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1,
            buffersize: int | None = None) -> Iterator[_T]: ...
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...
    def terminate_workers(self) -> None: ...
    def kill_workers(self) -> None: ...
