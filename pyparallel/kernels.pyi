# Type stubs for pyparallel.kernels. Every kernel is a pyparallel._core.Kernel at run time; the
# private classes below only give each one its argument and result types.
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, Generic, SupportsIndex, TypeVar, overload, type_check_only

from ._core import CancelToken as CancelToken, Kernel as Kernel, KernelCancelled as KernelCancelled

__all__ = [
    "Kernel", "CancelToken", "KernelCancelled", "fib", "cube_loop", "square",
    "weighted_multiply", "weighted_multiply_buffer", "openmp",
]

_A = TypeVar("_A", contravariant=True)
_R = TypeVar("_R", covariant=True)
_K = TypeVar("_K", bound=Hashable)
_N = TypeVar("_N", int, float)
_BufferT = TypeVar("_BufferT")

openmp: bool

@type_check_only
class _Unary(Kernel, Generic[_A, _R]):
    """A kernel of one argument: ``k(x)`` and ``k.map(xs)``."""
    def __call__(self, x: _A, /, *, cancel: CancelToken | None = None) -> _R: ...  # type: ignore[override]
    def map(self, inputs: Iterable[_A], /, threads: int | None = None, *,  # type: ignore[override]
            cancel: CancelToken | None = None) -> list[_R]: ...

@type_check_only
class _Square(_Unary[Any, Any]):
    @overload  # type: ignore[override]
    def __call__(self, x: int, /, *, cancel: CancelToken | None = None) -> int: ...
    @overload
    def __call__(self, x: float, /, *, cancel: CancelToken | None = None) -> float: ...
    @overload
    def __call__(self, x: Any, /, *, cancel: CancelToken | None = None) -> Any: ...
    def map(self, inputs: Iterable[_N], /, threads: int | None = None, *,  # type: ignore[override]
            cancel: CancelToken | None = None) -> list[_N]: ...

@type_check_only
class _WeightedMultiply(Kernel):
    """``[(kind, number, number * weights[kind]) for kind, number in items]``."""
    def __call__(self, items: Iterable[tuple[_K, _N]], weights: Mapping[_K, _N], /, *,  # type: ignore[override]
                 cancel: CancelToken | None = None) -> list[tuple[_K, _N, _N]]: ...
    def map(self, items: Iterable[tuple[_K, _N]], weights: Mapping[_K, _N], /,  # type: ignore[override]
            threads: int | None = None, *,
            cancel: CancelToken | None = None) -> list[tuple[_K, _N, _N]]: ...

fib: _Unary[SupportsIndex, int]
cube_loop: _Unary[SupportsIndex, int]
square: _Square
weighted_multiply: _WeightedMultiply

@overload
def weighted_multiply_buffer(numbers: Any, weights: Any, out: None = None,
                             threads: int | None = None, *,
                             cancel: CancelToken | None = None) -> Any: ...
@overload
def weighted_multiply_buffer(numbers: Any, weights: Any, out: _BufferT,
                             threads: int | None = None, *,
                             cancel: CancelToken | None = None) -> _BufferT: ...
