# Type stubs for pyparallel.process.
from collections.abc import Callable, Iterable, Mapping
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = ["Process"]

class Process(BaseProcess):
    def __init__(self, group: None = None, target: Callable[..., object] | None = None,
                 name: str | None = None, args: Iterable[Any] = (),
                 kwargs: Mapping[str, Any] = {}, *, daemon: bool | None = None,
                 context: str | BaseContext | None = None) -> None: ...
    def start(self) -> None: ...
