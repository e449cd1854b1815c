# Type stubs for pyparallel._pool.identity (re-exported by pyparallel and pyparallel.pool).
from typing import NamedTuple

__all__ = ["WorkerInfo", "current_worker"]

class WorkerInfo(NamedTuple):
    index: int  # type: ignore[assignment]  # the field shadows tuple.index, as at run time
    pid: int

def current_worker() -> WorkerInfo | None: ...
