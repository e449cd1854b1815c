"""Pickling of functions and task arguments, shared by every backend.

A function that the worker can import by name travels by reference. One that cannot (a
lambda, a closure, a function from ``__main__`` or a notebook cell that the worker does not
have) travels **by value**, but its globals resolve in **one namespace per module in the
worker**, not in a private dictionary per pickle:

- under fork that namespace is the inherited module itself (``__main__`` as it was when the
  worker was forked), so a global that existed then is not sent at all;
- under spawn and forkserver (and on a Dask worker) it is the worker's own ``__main__`` (or
  the imported module), and the names missing there are filled in from what was shipped. A
  name the worker already has is never overwritten.

So an initializer's ``global G`` is seen by later tasks under every start method, and the
workers need not re-run the main script. Classes and functions of ``__main__`` inside task
arguments follow the same rule. A backend sends each distinct function to each worker once
(see :mod:`pyparallel._pool.local.engine`), never once per task.

Which ``__main__`` objects a worker already has is the ``inherited`` mapping (name -> object)
given to :func:`dumps_func` and :func:`dumps`: under fork the functions and classes of
``__main__`` at the time the workers were forked (:func:`main_snapshot`), elsewhere empty. An
object that is still the same as its inherited one goes by reference, as multiprocessing
sends it.

Results are not pickled here: they travel as plain pickles, like multiprocessing's.
"""
from __future__ import annotations

import dis
import io
import linecache
import marshal
import pickle
import sys
import types
import warnings
import weakref

from . import _tunables

__all__ = ["dumps_func", "dumps", "loads", "main_snapshot", "names_snapshot"]

_MAIN_NAMES = ("__main__", "__mp_main__")


def main_snapshot() -> dict:
    """The functions and classes of ``__main__`` now: what a worker forked now inherits."""
    main = sys.modules.get("__main__")
    if main is None:
        return {}
    return {k: v for k, v in list(vars(main).items()) if isinstance(v, (types.FunctionType, type))}


def names_snapshot() -> frozenset:
    """The names ``__main__`` has now: a worker forked now has them all."""
    main = sys.modules.get("__main__")
    return frozenset(vars(main)) if main is not None else frozenset()


# ---- which globals a function reads ----------------------------------------------------

_GLOBAL_OPS = frozenset(("LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME"))
_code_names_cache: "weakref.WeakKeyDictionary[types.CodeType, tuple]" = weakref.WeakKeyDictionary()


def code_globals(code: types.CodeType) -> tuple:
    """The global names that ``code`` (and the code nested in it) reads or writes."""
    try:
        return _code_names_cache[code]
    except (KeyError, TypeError):
        pass
    names = {}
    stack = [code]
    while stack:
        c = stack.pop()
        for ins in dis.get_instructions(c):
            if ins.opname in _GLOBAL_OPS:
                names[ins.argval] = None
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    out = tuple(names)
    try:
        _code_names_cache[code] = out
    except TypeError:
        pass
    return out


# ---- the pickler -------------------------------------------------------------------------


def _cloudpickle():
    # imported when first needed: the local engine under fork rarely needs it
    import cloudpickle

    return cloudpickle


def _worker_namespace(module: str) -> dict:
    """The namespace a by-value function of ``module`` runs in, in this (worker) process."""
    mod = sys.modules.get(module)
    if mod is None and module not in _MAIN_NAMES:
        try:
            import importlib

            mod = importlib.import_module(module)
        except Exception:
            mod = None
    if mod is None:
        mod = sys.modules.get("__main__") if module in _MAIN_NAMES else None
    if mod is None:  # a module this process cannot import: one stand-in for it
        mod = _standins.get(module)
        if mod is None:
            mod = _standins[module] = types.ModuleType(module)
    return vars(mod)


_standins: dict = {}


def _load_code(data, source):
    """A code object sent by value: marshal keeps its file name, and ``source`` (a notebook
    cell's linecache entry, or None for a real file) lets the worker's traceback show its
    lines, as the sender's would."""
    code = marshal.loads(data)
    if source is not None:
        linecache.cache.setdefault(code.co_filename, source)
    return code


def _reduce_code(code):
    return _load_code, (marshal.dumps(code), _cell_source(code.co_filename))


def _make_function(module, name, code, ncells):
    cells = tuple(types.CellType() for _ in range(ncells)) if ncells else None
    return types.FunctionType(code, _worker_namespace(module), name, None, cells)


def _fill_function(func, state):
    qualname, module, defaults, kwdefaults, cells, fdict, shipped, doc = state
    ns = func.__globals__
    for k, v in shipped.items():
        if k not in ns:  # never overwrite what the worker has
            ns[k] = v
    func.__qualname__ = qualname
    func.__module__ = module
    func.__defaults__ = defaults
    func.__kwdefaults__ = kwdefaults
    func.__doc__ = doc
    if fdict:
        func.__dict__.update(fdict)
    if func.__closure__:
        for cell, value in zip(func.__closure__, cells):
            if value is not _EMPTY:
                cell.cell_contents = value


class _Empty:
    def __reduce__(self):
        return "_EMPTY"


_EMPTY = _Empty()  # an empty closure cell


def _cell_source(filename):
    """The linecache entry of code that has no file to read it from again (a notebook cell,
    IPython's input): shipped with a by-value function so its traceback shows the lines."""
    entry = linecache.cache.get(filename)
    if entry is None or len(entry) != 4 or entry[1] is not None:
        return None  # a real file (the worker reads it) or nothing known
    return entry


def _register_class(cls, state, module, qualname, setstate):
    setstate(cls, state)
    if "." not in qualname:
        ns = _worker_namespace(module)
        ns.setdefault(qualname, cls)  # so that results of this class pickle back by name
    return cls


def _by_value_modules(obj) -> bool:
    module = getattr(obj, "__module__", None)
    if module in _MAIN_NAMES:
        return True
    return "<" in getattr(obj, "__qualname__", "<")


class _Pickler:
    """Made on first use: a cloudpickle Pickler whose functions and classes of ``__main__``
    (and lambdas, closures) resolve their globals in the worker's namespace; and one that also
    has multiprocessing's reducers (Connections, sockets: what ``ForkingPickler`` sends while
    a child starts)."""

    cls = None
    forking_cls = None

    @classmethod
    def get(cls, forking=False):
        if cls.cls is None:
            cls.cls = _make_pickler_class()
        if not forking:
            return cls.cls
        if cls.forking_cls is None:
            import collections
            from multiprocessing.reduction import ForkingPickler

            base = cls.cls
            # seen live, as ForkingPickler sees them (register() may add more later)
            cls.forking_cls = type("ForkingPickler", (base,), {
                "dispatch_table": collections.ChainMap(ForkingPickler._extra_reducers,
                                                       base.dispatch_table)})
        return cls.forking_cls


def _make_pickler_class():
    cp = _cloudpickle()
    base = cp.Pickler
    class_reduce = getattr(cp.cloudpickle, "_dynamic_class_reduce", None)

    class Pickler(base):
        def __init__(self, file, inherited, skip_names, protocol=5, buffer_callback=None):
            super().__init__(file, protocol=protocol, buffer_callback=buffer_callback)
            self.inherited = inherited
            self.skip_names = skip_names

        def reducer_override(self, obj):
            t = type(obj)
            if t is types.FunctionType:
                module = obj.__module__
                if module in _MAIN_NAMES and self.inherited.get(obj.__name__) is obj \
                        and obj.__qualname__ == obj.__name__:
                    return obj.__qualname__  # the worker has this very function: by name
                if _by_value_modules(obj):
                    return self._func_reduce(obj)
                return super().reducer_override(obj)
            if isinstance(obj, type) and getattr(obj, "__module__", None) in _MAIN_NAMES:
                name = obj.__qualname__
                if self.inherited.get(name) is obj:
                    return name
                rv = super().reducer_override(obj)
                if class_reduce is not None and type(rv) is tuple and len(rv) == 6 \
                        and rv[5] is not None:
                    make, args, state, li, di, setstate = rv
                    return (make, args, (state, obj.__module__, name, setstate), li, di,
                            _register_class_state)
                return rv
            if t is types.CodeType:
                # every function sent by value, also those cloudpickle sends itself (a
                # classmethod, a method of a class sent by value), which would otherwise
                # arrive as "<dynamic-code>" with no source line in its tracebacks
                return _reduce_code(obj)
            return super().reducer_override(obj)

        def _func_reduce(self, func):
            module = func.__module__
            g = func.__globals__
            skip = self.skip_names if module in _MAIN_NAMES else ()
            shipped = {}
            for n in code_globals(func.__code__):
                if n in g and n not in skip:
                    shipped[n] = g[n]
            cells = []
            for c in func.__closure__ or ():
                try:
                    cells.append(c.cell_contents)
                except ValueError:
                    cells.append(_EMPTY)
            state = (func.__qualname__, module, func.__defaults__, func.__kwdefaults__,
                     tuple(cells), dict(func.__dict__) or None, shipped, func.__doc__)
            args = (module, func.__name__, func.__code__, len(cells))
            return (_make_function, args, state, None, None, _fill_function)

    return Pickler


def _register_class_state(cls, packed):
    state, module, qualname, setstate = packed
    return _register_class(cls, state, module, qualname, setstate)


def dumps(obj, inherited=None, skip_names=(), buffer_callback=None, forking=False) -> bytes:
    """Pickle ``obj`` (protocol 5) so that a worker that has ``inherited`` (see the module
    docstring) can load it: functions and classes of ``__main__`` by value unless inherited,
    lambdas and closures by value; ``skip_names``: globals of ``__main__`` not to ship (the
    worker has them). ``forking``: with multiprocessing's own reducers too, for an object
    sent while multiprocessing starts a child (``pp.Process``)."""
    f = io.BytesIO()
    _Pickler.get(forking)(f, inherited or {}, skip_names, 5, buffer_callback).dump(obj)
    return f.getvalue()


loads = pickle.loads


# ---- functions ---------------------------------------------------------------------------

_warned = weakref.WeakSet()


def _captured(func, names):
    """What a by-value pickle of a plain function depends on, compared by identity (an
    object mutated in place keeps its identity: such a change is not seen, as under fork)."""
    g = func.__globals__
    out = [func.__code__, func.__defaults__, func.__kwdefaults__]
    for c in func.__closure__ or ():
        try:
            out.append(c.cell_contents)
        except ValueError:
            out.append(_EMPTY)
    for n in names:
        out.append(g.get(n, _EMPTY))
    return out


class FunctionPickles:
    """One backend's function pickles, cached per function object while nothing the pickle
    captured has changed (a loop of apply_async on a notebook function pickles it once)."""

    def __init__(self, inherited=None, skip_names=()):
        self.inherited = inherited or {}
        self.skip_names = skip_names
        self._cache = weakref.WeakKeyDictionary()  # function -> (captured, names, pickle)

    def dumps(self, func) -> bytes:
        return dumps_func(func, self.inherited, self.skip_names, self._cache)


def dumps_func(func, inherited=None, skip_names=(), cache=None) -> bytes:
    """Pickle a callable for a worker that has ``inherited`` (see :func:`dumps`)."""
    plain = type(func) is types.FunctionType
    if plain and not _by_value_modules(func):
        try:
            return pickle.dumps(func, 5)  # importable: by reference
        except Exception:
            pass
    elif plain and (inherited or {}).get(func.__name__) is func \
            and func.__qualname__ == func.__name__:
        return pickle.dumps(func, 5)  # the worker inherited this very function
    if not plain:
        try:
            data = pickle.dumps(func, 5)
        except Exception:
            return dumps(func, inherited, skip_names)
        if b"__main__" not in data:
            return data
        return dumps(func, inherited, skip_names)
    if cache is not None:
        hit = cache.get(func)
        if hit is not None and hit[0][0] is func.__code__:
            now = _captured(func, hit[1])
            if len(now) == len(hit[0]) and all(a is b for a, b in zip(now, hit[0])):
                return hit[2]
    data = dumps(func, inherited, skip_names)
    if len(data) > _tunables.BIG_FUNCTION_BYTES and func not in _warned:
        _warned.add(func)
        warnings.warn(
            f"pyparallel: {func.__qualname__} travels by value with {len(data) >> 20} MB of "
            "the globals it reads (sent once to each worker). Pass big objects as arguments, "
            "or keep them in pyparallel.Array, to avoid the copy.", ResourceWarning, stacklevel=4)
    if cache is not None:
        try:
            names = code_globals(func.__code__)
            cache[func] = (_captured(func, names), names, data)
        except TypeError:
            pass
    return data
