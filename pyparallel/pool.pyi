# Type stubs for pyparallel.pool: Pool and ThreadPool (checked against pool.py by
# tests/test_types.py). A native kernel given to imap/imap_unordered runs in-process and yields
# a plain iterator, hence the kernel overloads.
import multiprocessing.pool as _mpp
from collections.abc import Callable, Iterable, Iterator, Mapping
from multiprocessing.context import BaseContext
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar, overload, type_check_only

from typing_extensions import Self, TypeAlias

from ._pool.errors import (InitializerError as InitializerError,
                           MaybeEncodingError as MaybeEncodingError,
                           PoolTerminatedError as PoolTerminatedError,
                           RemoteTraceback as RemoteTraceback,
                           TaskCancelledError as TaskCancelledError,
                           TaskTimeoutError as TaskTimeoutError, TimeoutError as TimeoutError,
                           WorkerLostError as WorkerLostError)
from ._pool.identity import WorkerInfo as WorkerInfo, current_worker as current_worker
from ._pool.results import (ApplyResult as ApplyResult, AsyncResult as AsyncResult,
                            IMapIterator as IMapIterator,
                            IMapUnorderedIterator as IMapUnorderedIterator,
                            MapResult as MapResult)
from .kernels import _Unary

__all__ = [
    "Pool", "ThreadPool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator",
    "IMapUnorderedIterator", "WorkerLostError", "InitializerError", "PoolTerminatedError",
    "TaskCancelledError", "TaskTimeoutError", "TimeoutError", "WorkerInfo", "current_worker",
    "RemoteTraceback", "MaybeEncodingError", "default_start_method",
]

_S = TypeVar("_S")
_T = TypeVar("_T")
_A = TypeVar("_A")
_B = TypeVar("_B")
_C = TypeVar("_C")

@type_check_only
class _ProgressBar(Protocol):
    """A tqdm bar, or anything like it: advanced by update(n), closed at the end."""
    def update(self, n: int, /) -> object: ...
    def close(self) -> object: ...

# progress=: True (a tqdm bar), a bar, or a callable(done, total). map and starmap know their
# total; imap's is None when the input has no length.
_Progress: TypeAlias = bool | _ProgressBar | Callable[[int, int], object] | None
_IProgress: TypeAlias = bool | _ProgressBar | Callable[[int, int | None], object] | None
_Context: TypeAlias = str | BaseContext | None

def default_start_method() -> str: ...

class Pool:
    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., object] | None = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                 context: _Context = None, *, backend: Literal["local", "dask"] | None = None,
                 task_timeout: float | None = None, **options: Any) -> None: ...
    @property
    def start_method(self) -> str | None: ...
    @property
    def _pool(self) -> list[Any]: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, exc_type: type[BaseException] | None, exc_val: BaseException | None,
                 exc_tb: TracebackType | None) -> None: ...
    def __del__(self) -> None: ...
    def close(self) -> None: ...
    def terminate(self) -> None: ...
    def join(self) -> None: ...

    @overload
    def apply(self, func: Callable[[], _T], args: tuple[()] = (),
              kwds: Mapping[str, Any] = {}, *, task_timeout: float | None = None) -> _T: ...
    @overload
    def apply(self, func: Callable[[_A], _T], args: tuple[_A],
              kwds: Mapping[str, Any] = {}, *, task_timeout: float | None = None) -> _T: ...
    @overload
    def apply(self, func: Callable[[_A, _B], _T], args: tuple[_A, _B],
              kwds: Mapping[str, Any] = {}, *, task_timeout: float | None = None) -> _T: ...
    @overload
    def apply(self, func: Callable[[_A, _B, _C], _T], args: tuple[_A, _B, _C],
              kwds: Mapping[str, Any] = {}, *, task_timeout: float | None = None) -> _T: ...
    @overload
    def apply(self, func: Callable[..., _T], args: Iterable[Any] = (),
              kwds: Mapping[str, Any] = {}, *, task_timeout: float | None = None) -> _T: ...

    @overload
    def apply_async(self, func: Callable[[], _T], args: tuple[()] = (),
                    kwds: Mapping[str, Any] = {},
                    callback: Callable[[_T], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None, *,
                    task_timeout: float | None = None) -> ApplyResult[_T]: ...
    @overload
    def apply_async(self, func: Callable[[_A], _T], args: tuple[_A],
                    kwds: Mapping[str, Any] = {},
                    callback: Callable[[_T], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None, *,
                    task_timeout: float | None = None) -> ApplyResult[_T]: ...
    @overload
    def apply_async(self, func: Callable[[_A, _B], _T], args: tuple[_A, _B],
                    kwds: Mapping[str, Any] = {},
                    callback: Callable[[_T], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None, *,
                    task_timeout: float | None = None) -> ApplyResult[_T]: ...
    @overload
    def apply_async(self, func: Callable[..., _T], args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] = {},
                    callback: Callable[[_T], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None, *,
                    task_timeout: float | None = None) -> ApplyResult[_T]: ...

    def map(self, func: Callable[[_S], _T], iterable: Iterable[_S], chunksize: int | None = None,
            *, progress: _Progress = None, task_timeout: float | None = None) -> list[_T]: ...
    def map_async(self, func: Callable[[_S], _T], iterable: Iterable[_S],
                  chunksize: int | None = None,
                  callback: Callable[[list[_T]], object] | None = None,
                  error_callback: Callable[[BaseException], object] | None = None, *,
                  progress: _Progress = None,
                  task_timeout: float | None = None) -> MapResult[_T]: ...

    @overload
    def starmap(self, func: Callable[[_A], _T], iterable: Iterable[tuple[_A]],
                chunksize: int | None = None, *, progress: _Progress = None,
                task_timeout: float | None = None) -> list[_T]: ...
    @overload
    def starmap(self, func: Callable[[_A, _B], _T], iterable: Iterable[tuple[_A, _B]],
                chunksize: int | None = None, *, progress: _Progress = None,
                task_timeout: float | None = None) -> list[_T]: ...
    @overload
    def starmap(self, func: Callable[[_A, _B, _C], _T], iterable: Iterable[tuple[_A, _B, _C]],
                chunksize: int | None = None, *, progress: _Progress = None,
                task_timeout: float | None = None) -> list[_T]: ...
    @overload
    def starmap(self, func: Callable[..., _T], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None, *, progress: _Progress = None,
                task_timeout: float | None = None) -> list[_T]: ...

    @overload
    def starmap_async(self, func: Callable[[_A, _B], _T], iterable: Iterable[tuple[_A, _B]],
                      chunksize: int | None = None,
                      callback: Callable[[list[_T]], object] | None = None,
                      error_callback: Callable[[BaseException], object] | None = None, *,
                      progress: _Progress = None,
                      task_timeout: float | None = None) -> MapResult[_T]: ...
    @overload
    def starmap_async(self, func: Callable[..., _T], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None,
                      callback: Callable[[list[_T]], object] | None = None,
                      error_callback: Callable[[BaseException], object] | None = None, *,
                      progress: _Progress = None,
                      task_timeout: float | None = None) -> MapResult[_T]: ...

    @overload
    def imap(self, func: _Unary[_S, _T], iterable: Iterable[_S],  # type: ignore[overload-overlap]
             chunksize: int = 1, *, progress: _IProgress = None,
             task_timeout: float | None = None) -> Iterator[_T]: ...
    @overload
    def imap(self, func: Callable[[_S], _T], iterable: Iterable[_S], chunksize: int = 1, *,
             progress: _IProgress = None,
             task_timeout: float | None = None) -> IMapIterator[_T]: ...
    @overload
    def imap_unordered(self, func: _Unary[_S, _T],  # type: ignore[overload-overlap]
                       iterable: Iterable[_S], chunksize: int = 1, *,
                       progress: _IProgress = None,
                       task_timeout: float | None = None) -> Iterator[_T]: ...
    @overload
    def imap_unordered(self, func: Callable[[_S], _T], iterable: Iterable[_S],
                       chunksize: int = 1, *, progress: _IProgress = None,
                       task_timeout: float | None = None) -> IMapUnorderedIterator[_T]: ...

class ThreadPool(_mpp.ThreadPool):
    # task_timeout: only None (threads cannot be killed: anything else raises ValueError)
    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., object] | None = None,
                 initargs: Iterable[Any] = (), *, task_timeout: None = None) -> None: ...
