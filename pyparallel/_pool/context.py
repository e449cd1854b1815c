"""The start-method rule, and starting workers without re-running the main script.

**The rule**: ``context=None`` is the standard library's default context on the running
Python, exactly what ``multiprocessing.Pool()`` uses (``multiprocessing.get_context()``: fork on
Linux up to Python 3.13, forkserver from 3.14, or what ``multiprocessing.set_start_method()``
chose). It does not depend on what else runs in the process: numpy's OpenBLAS threads, tqdm's
monitor, a closed ThreadPool, pyparallel's own collector threads and kernel team leave it
unchanged. ``context=`` takes a context or a method name. ``pool.start_method`` says which
method a pool uses.

Fork is safe with what pyparallel knows: its own threads (the kernels' team is taken down
before a fork, the collector holds no lock while it forks), OpenBLAS (it has fork handlers).
What it knows to be unsafe is a GNU OpenMP (or Intel/LLVM OpenMP) runtime other than its own,
as wheels of other libraries vendor, with threads alive: a worker forked then may deadlock in
it. Then the pool warns once, naming the runtime, and still uses the method it was given.

**No main guard needed**: under spawn and forkserver, multiprocessing re-runs the main script
in every child (as ``__mp_main__``) so that functions defined there can be found by name; a
script without an ``if __name__ == "__main__":`` guard then starts pools from its children and
fails. pyparallel's workers run an importable function and get the functions and classes of
``__main__`` by value (:mod:`pyparallel._serialize`), so they are started with the main
module left out of the preparation data (the rest, ``sys.path``, the working directory, the
process name, is kept). The main script runs exactly once.

**A forked child starts its own forkserver**: a process made by ``os.fork()`` (or a fork-context
``Process``) inherits the standard library's forkserver state, naming its parent's server,
which it cannot wait for: multiprocessing's ``ensure_running()`` then raises
``ChildProcessError`` at the child's first forkserver start. The child forgets that state at
the fork, so its first forkserver start launches a server of its own.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import warnings
import multiprocessing.spawn as _spawn
import sys
import threading

from .. import _core

__all__ = ["resolve", "method_name", "no_main", "fork_hazard", "warn_fork_hazard"]


def resolve(context):
    """The multiprocessing context a pool runs on (see the module docstring)."""
    if context is None:
        return multiprocessing.get_context()
    if isinstance(context, str):
        return multiprocessing.get_context(context)
    return context


def method_name(ctx):
    """"fork", "forkserver" or "spawn" (None for a context of unknown kind)."""
    try:
        name = ctx.get_start_method()
    except Exception:
        return None
    return name if isinstance(name, str) else None


_tls = threading.local()
_install_lock = threading.Lock()
_original = []


def _install():
    """Wraps multiprocessing.spawn.get_preparation_data once: inside :func:`no_main` (on that
    thread only) the main module is left out; everywhere else nothing changes."""
    with _install_lock:
        if _original:
            return
        original = _spawn.get_preparation_data
        _original.append(original)

        def get_preparation_data(name):
            data = original(name)
            if getattr(_tls, "no_main", False):
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
            return data

        get_preparation_data.__doc__ = original.__doc__
        get_preparation_data.__wrapped__ = original
        _spawn.get_preparation_data = get_preparation_data


@contextlib.contextmanager
def no_main():
    """Processes started in this block (spawn, forkserver, and a forkserver started here)
    do not import the main module."""
    _install()
    old = getattr(_tls, "no_main", False)
    _tls.no_main = True
    try:
        yield
    finally:
        _tls.no_main = old


def _forget_parents_forkserver():
    """After a fork, in the child: the inherited forkserver is the parent's (see the module
    docstring); drop it (and the child's copy of its keep-alive descriptor)."""
    mod = sys.modules.get("multiprocessing.forkserver")
    server = getattr(mod, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is None:
        return
    alive = server._forkserver_alive_fd
    server._forkserver_pid = None
    server._forkserver_address = None
    server._forkserver_alive_fd = None
    if hasattr(server, "_forkserver_authkey"):
        server._forkserver_authkey = None
    if alive is not None:
        try:
            os.close(alive)
        except OSError:
            pass


os.register_at_fork(after_in_child=_forget_parents_forkserver)


_OPENMP_NAMES = ("libgomp", "libiomp", "libomp")
_SYSTEM_DIRS = ("/usr/lib", "/lib", "/usr/local/lib")
_warned = []


def _openmp_runtimes():
    """Paths of the OpenMP runtimes loaded into this process (from the dynamic loader's own
    list: reading /proc/self/maps costs a pool's creation 1-2 ms in a process that has
    imported numpy, scipy and the like)."""
    names = ((path, path.rsplit("/", 1)[-1]) for path in _core.loaded_objects())
    return {path for path, name in names if name.startswith(_OPENMP_NAMES) and ".so" in name}


def _unknown_threads():
    """OS threads of this process that are not Python threads."""
    try:
        tids = {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return 0
    known = {t.native_id for t in threading.enumerate()}
    return len(tids - known)


def fork_hazard():
    """Why forking now may deadlock a worker (a foreign OpenMP runtime with live threads),
    or None."""
    foreign = sorted(p for p in _openmp_runtimes() if not p.startswith(_SYSTEM_DIRS))
    if not foreign:
        return None
    n = _unknown_threads()
    if n == 0:
        return None
    return (f"an OpenMP runtime other than pyparallel's is loaded ({', '.join(foreign)}) and "
            f"{n} thread(s) Python does not know are running")


def warn_fork_hazard(method):
    """One warning per process when a pool forks while :func:`fork_hazard` says so."""
    if method != "fork" or _warned:
        return
    reason = fork_hazard()
    if reason is None:
        return
    _warned.append(reason)
    warnings.warn(f"pyparallel: the pool uses the fork start method while {reason}; a worker "
                  "forked now could deadlock in that runtime. If workers hang, pass "
                  "context='forkserver' or 'spawn'.", RuntimeWarning, stacklevel=4)
