# Type stubs for the pyparallel package: its public names (checked by tests/test_types.py
# against pyparallel.__all__ and against the modules' real signatures).
from typing import Final

from . import kernels as kernels
from ._cpu import cpu_count as cpu_count, default_threads as default_threads
from ._reuse import get_reusable_pool as get_reusable_pool
from .futures import ProcessPoolExecutor as ProcessPoolExecutor
from .pool import (Pool as Pool, TaskTimeoutError as TaskTimeoutError, ThreadPool as ThreadPool,
                   WorkerInfo as WorkerInfo, current_worker as current_worker)
from .process import Process as Process
from .queues import (JoinableQueue as JoinableQueue, Pipe as Pipe, Queue as Queue,
                     SimpleQueue as SimpleQueue)
from .runner import CommandResult as CommandResult, run_commands as run_commands
from .shared import (Array as Array, Barrier as Barrier, BoundedSemaphore as BoundedSemaphore,
                     Condition as Condition, Event as Event, Lock as Lock, RawArray as RawArray,
                     RawValue as RawValue, RLock as RLock, Semaphore as Semaphore,
                     Value as Value)

__version__: Final[str]

__all__ = [
    "kernels", "cpu_count", "__version__", "Pool", "ThreadPool", "TaskTimeoutError",
    "WorkerInfo", "current_worker", "get_reusable_pool", "ProcessPoolExecutor",
    "Value", "Array", "RawValue", "RawArray", "Lock", "RLock", "Semaphore",
    "BoundedSemaphore", "Barrier", "Event", "Condition", "run_commands", "CommandResult",
    "Queue", "JoinableQueue", "SimpleQueue", "Pipe", "Process",
]
