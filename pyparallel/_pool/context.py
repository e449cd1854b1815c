"""The start-method rule, and starting workers without re-running the main script.

**The rule**: ``context=None`` is the standard library's default context on the running
Python, exactly what ``multiprocessing.Pool()`` uses (``multiprocessing.get_context()``: fork on
Linux up to Python 3.13, forkserver from 3.14, or what ``multiprocessing.set_start_method()``
chose). It does not depend on what else runs in the process: numpy's OpenBLAS threads, tqdm's
monitor, a closed ThreadPool, pyparallel's own collector threads and kernel team leave it
unchanged. ``context=`` takes a context or a method name. ``pool.start_method`` says which
method a pool uses.

**No main guard needed**: under spawn and forkserver, multiprocessing re-runs the main script
in every child (as ``__mp_main__``) so that functions defined there can be found by name; a
script without an ``if __name__ == "__main__":`` guard then starts pools from its children and
fails. pyparallel's workers run an importable function and get the functions and classes of
``__main__`` by value (:mod:`pyparallel._serialize`), so they are started with the main
module left out of the preparation data (the rest, ``sys.path``, the working directory, the
process name, is kept). The main script runs exactly once.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.spawn as _spawn
import threading

__all__ = ["resolve", "method_name", "no_main"]


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
