"""pp.Process: multiprocessing.Process with pyparallel's start-method rule and function pickling.

Same API (start, run, join, terminate, kill, is_alive, close, exitcode, pid, name, daemon,
ident, sentinel, authkey). Two differences, both so that the same code runs under every start
method:

- The start method is multiprocessing's default context at ``start()`` (what
  ``multiprocessing.Process`` uses: ``set_start_method`` is honoured, and the platform default
  otherwise), unless ``context=`` names one ("fork", "spawn", "forkserver") or passes a
  context.
- Under spawn and forkserver, a target that plain pickle cannot send (a lambda, a closure, a
  function defined in a notebook or in ``__main__`` of an interactive session) travels by
  value with cloudpickle, and so do arguments that need it. multiprocessing fails on those
  with a PicklingError.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context as _mpctx
import multiprocessing.process as _mpprocess
from multiprocessing.reduction import ForkingPickler

import cloudpickle

__all__ = ["Process"]


class _ByValue:
    """A callable with its arguments, pickled by cloudpickle (for spawn and forkserver)."""

    def __init__(self, target, args, kwargs):
        self.payload = cloudpickle.dumps((target, args, kwargs))

    def __call__(self):
        target, args, kwargs = cloudpickle.loads(self.payload)
        return target(*args, **kwargs)


def _picklable(obj):
    try:
        ForkingPickler.dumps(obj)
        return True
    except Exception:
        return False


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
        # (after a start, the stdlib deletes _target; its start() then says "twice")
        if ctx.get_start_method() != "fork" and getattr(self, "_target", None) is not None and not (
                _picklable(self._target) and _picklable((self._args, self._kwargs))):
            self._target = _ByValue(self._target, self._args, self._kwargs)
            self._args, self._kwargs = (), {}
        self._pp_method = ctx.get_start_method()
        if self._pp_context is not None:
            self._start_method = self._pp_method   # as ctx.Process does
        super().start()

    def _Popen(self, process_obj):
        return multiprocessing.get_context(self._pp_method).Process._Popen(process_obj)
