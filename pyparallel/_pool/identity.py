"""Which worker runs the current task: :func:`pyparallel.current_worker`."""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["WorkerInfo", "current_worker"]


class WorkerInfo(NamedTuple):
    """A pool worker: its ``index`` in the pool (0 .. processes-1; a replaced worker's
    successor has the same index) and its ``pid``."""

    index: int
    pid: int


_current = None


def current_worker():
    """The :class:`WorkerInfo` of the pool worker running this code, or None outside one."""
    return _current


def _set(info):
    global _current
    _current = info
