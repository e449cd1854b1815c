# Type stubs for the C core. Internal: use the pyparallel package.
from collections.abc import Iterable, Mapping
from typing import Any, Final

__version__: Final[str]
HAVE_OPENMP: Final[bool]

class Kernel:
    __name__: str
    __qualname__: str
    unary: bool
    def __call__(self, *args: Any) -> Any: ...
    def map(self, *inputs: Any, threads: int | None = None) -> list[Any]: ...

fib: Kernel
cube_loop: Kernel
square: Kernel
weighted_multiply: Kernel

def set_default_threads(n: int, /) -> None: ...
def get_default_threads() -> int: ...
def _kernel_by_name(name: str, /) -> Kernel: ...
def _weighted_multiply_buffer(numbers: Any, weights: Any, out: Any, threads: int | None = None, /) -> Any: ...
