"""Pool workers under the "fork" start method, forked directly.

``multiprocessing``'s fork ``Popen`` costs more than the fork itself: two pipes per child, a
finalizer, a scan of all children at every start. A pool starts its workers in a burst and
watches them through pidfds, so :class:`ForkedProcess` forks and lets the child run
multiprocessing's own bootstrap (``current_process()``, after-fork hooks, finalizers and
stdio flushing at exit: what a task sees is the same as under ``ctx.Process``). It has the
part of the ``Process`` interface a pool uses: ``pid``, ``sentinel`` (a pidfd: readable once
the child has exited), ``exitcode``, ``kill()``, ``join(timeout)``, ``close()``.

Workers started this way are not in ``multiprocessing.active_children()``; the pool reaps
them itself (terminate, garbage collection, interpreter exit).
"""
from __future__ import annotations

import atexit
import multiprocessing.util as _mp_util
import os
import select
import signal
import sys

from ... import _core
from ..errors import UNKNOWN_EXIT

__all__ = ["available", "ForkedProcess", "UNKNOWN_EXIT"]


def available() -> bool:
    """True where pidfds exist (Linux 5.3+ and a Python that has os.pidfd_open)."""
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


#: From Python 3.12 multiprocessing's fork child runs its exit finalizers (a Queue's feeder
#: flush among them) through atexit, around _bootstrap, instead of inside it: do the same.
_ATEXIT_CHILD = sys.version_info >= (3, 12)


def _child(proc, parent_pid):
    code = 1
    try:
        if _ATEXIT_CHILD:
            atexit._clear()
            atexit.register(_mp_util._exit_function)
        try:
            sentinel = os.pidfd_open(parent_pid)  # multiprocessing.parent_process().is_alive()
        except OSError:
            sentinel = None
        code = proc._bootstrap(parent_sentinel=sentinel)
    finally:
        if _ATEXIT_CHILD:
            atexit._run_exitfuncs()
        os._exit(code)


class ForkedProcess:
    """A forked child running ``proc``'s target (``proc``: an unstarted fork-context Process,
    which gives the child its name and identity)."""

    __slots__ = ("pid", "sentinel", "_code", "name", "daemon")

    def __init__(self, proc):
        parent = os.getpid()
        # _core.fork: os.fork() without Python 3.12's warning about the pool's own threads
        pid = _core.fork()
        if pid == 0:
            _child(proc, parent)
        self.pid = pid
        self.name = proc.name
        self.daemon = True
        self._code = None
        try:
            self.sentinel = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise

    @property
    def exitcode(self):
        if self._code is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler): gone anyway
                self._code = UNKNOWN_EXIT
            else:
                if pid:
                    self._code = os.waitstatus_to_exitcode(status)
        return self._code

    def is_alive(self):
        return self.exitcode is None

    def terminate(self):
        if self.exitcode is None:
            try:
                signal.pidfd_send_signal(self.sentinel, signal.SIGTERM)
            except (OSError, AttributeError):
                os.kill(self.pid, signal.SIGTERM)

    def __repr__(self):
        state = "alive" if self._code is None else f"exitcode={self._code}"
        return f"<ForkedProcess name={self.name!r} pid={self.pid} {state}>"

    def kill(self):
        if self.exitcode is None:
            try:
                signal.pidfd_send_signal(self.sentinel, signal.SIGKILL)
            except (OSError, AttributeError):
                os.kill(self.pid, signal.SIGKILL)

    def join(self, timeout=None):
        if self.exitcode is not None:
            return
        p = select.poll()
        p.register(self.sentinel, select.POLLIN)
        p.poll(None if timeout is None else max(0, int(timeout * 1000)))
        self.exitcode  # noqa: B018 - reaps the child if it has exited

    def close(self):
        if self.exitcode is None:
            raise ValueError("Cannot close a process while it is still running.")
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1
