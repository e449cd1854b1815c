"""pp.Process: multiprocessing.Process with pyparallel's start-method rule and function pickling.

Same API (start, run, join, terminate, kill, is_alive, close, exitcode, pid, name, daemon,
ident, sentinel, authkey). Two differences, both so that the same code runs under every start
method:

- The start method is multiprocessing's default context at ``start()`` (what
  ``multiprocessing.Process`` uses: ``set_start_method`` is honoured, and the platform default
  otherwise), unless ``context=`` names one ("fork", "spawn", "forkserver") or passes a
  context.
- Under spawn and forkserver, the child never re-runs the main script (multiprocessing
  imports it in every child as ``__mp_main__``, so a script without an
  ``if __name__ == "__main__":`` guard starts processes from its children and fails): the
  child is started as the pool's workers are (:func:`pyparallel._pool.context.no_main`), and
  the process object (its target, arguments, and its class if it is a subclass defined in
  ``__main__``) travels with :mod:`pyparallel._serialize`: functions and classes of
  ``__main__``, lambdas and closures by value, their globals resolved in the child's own
  ``__main__``. Queues, pipes, locks and shared objects in the arguments travel as
  multiprocessing sends them. A script's top level runs once.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context as _mpctx
import multiprocessing.process as _mpprocess

from . import _serialize
from ._pool import context as _context

__all__ = ["Process"]


def _rebuild(data):
    """The child's side of :meth:`Process.__reduce__`."""
    cls, state = _serialize.loads(data)
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def _resolve_context(context):
    if context is None:
        return multiprocessing.get_context()   # the default context, as Process.start() uses
    if isinstance(context, str):
        return multiprocessing.get_context(context)
    if isinstance(context, _mpctx.BaseContext):
        return context
    raise TypeError("context must be None, a start method name or a multiprocessing context")


class Process(_mpprocess.BaseProcess):
    """multiprocessing.Process; see the module docstring for what ``context=`` adds."""

    _start_method = None   # as multiprocessing.Process: the child keeps its default context

    def __init__(self, group=None, target=None, name=None, args=(), kwargs={}, *, daemon=None,
                 context=None):
        if context is not None:
            _resolve_context(context)   # a bad name fails here, as the stdlib's get_context
        super().__init__(group, target, name, args, kwargs, daemon=daemon)
        self._pp_context = context if isinstance(context, str) or context is None else \
            context.get_start_method()

    def start(self):
        ctx = _resolve_context(self._pp_context)
        self._pp_method = ctx.get_start_method()
        if self._pp_context is not None:
            self._start_method = self._pp_method   # as ctx.Process does
        if self._pp_method == "fork":
            super().start()
            return
        with _context.no_main():
            super().start()

    def _Popen(self, process_obj):
        return multiprocessing.get_context(self._pp_method).Process._Popen(process_obj)

    def __reduce__(self):
        # Pickled while multiprocessing starts the child (spawn, forkserver): by
        # pyparallel's pickler, since that child does not import the main script.
        return _rebuild, (_serialize.dumps((type(self), self.__dict__), forking=True),)
