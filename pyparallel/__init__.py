"""pyparallel: parallel computing for Python on one machine, in C.

- :mod:`pyparallel.kernels`: native kernels (fib, cube_loop, square, weighted_multiply)
  that release the GIL, with bulk ``.map`` forms on a thread team.
- :mod:`pyparallel.shared`: Value, Array, RawValue, RawArray and process-shared locks
  (drop-ins for multiprocessing's) with atomics, zero-copy numpy and pickling by handle.
- :func:`run_commands` (and ``python -m pyparallel run``): shell commands N at a time.
- :func:`cpu_count`: the CPUs this process may really use (affinity and cgroup quotas).
"""
from . import _core

__version__ = "0.1.0"

if _core.__version__ != __version__:  # a stale build in the tree: refuse to run with it
    raise ImportError(
        f"pyparallel {__version__} found a _core extension built for {_core.__version__}; "
        "rebuild it (make build, or pip install .)"
    )

from . import kernels  # noqa: E402
from ._cpu import cpu_count, default_threads  # noqa: E402
from .pool import (Pool, TaskTimeoutError, ThreadPool, WorkerInfo,  # noqa: E402
                   current_worker)
from .runner import CommandResult, run_commands  # noqa: E402
from ._reuse import get_reusable_pool  # noqa: E402
from .futures import ProcessPoolExecutor  # noqa: E402
from .shared import (  # noqa: E402
    Array, Barrier, BoundedSemaphore, Condition, Event, Lock, RawArray, RawValue, RLock,
    Semaphore, Value,
)

_core.set_default_threads(default_threads())

__all__ = ["kernels", "cpu_count", "__version__", "Pool", "ThreadPool", "TaskTimeoutError",
           "WorkerInfo", "current_worker"]
__all__ += ["get_reusable_pool", "ProcessPoolExecutor"]
__all__ += ["Value", "Array", "RawValue", "RawArray", "Lock", "RLock", "Semaphore",
            "BoundedSemaphore", "Barrier", "Event", "Condition"]
__all__ += ["run_commands", "CommandResult"]

# Communication: queues, pipes and processes (pyparallel/queues.py, pyparallel/process.py).
from .process import Process  # noqa: E402
from .queues import JoinableQueue, Pipe, Queue, SimpleQueue  # noqa: E402

__all__ += ["Queue", "JoinableQueue", "SimpleQueue", "Pipe", "Process"]
