# Type stubs for pyparallel._reuse (get_reusable_pool is re-exported by pyparallel).
from collections.abc import Callable, Iterable
from typing import Any

from .pool import Pool, _Context

__all__ = ["get_reusable_pool"]

def get_reusable_pool(processes: int | None = None,
                      initializer: Callable[..., object] | None = None,
                      initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                      context: _Context = None) -> Pool: ...
