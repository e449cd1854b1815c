"""Message encoding for the pool's channel: pickle protocol 5 with out-of-band buffers.

A message is a tuple of parts written back to back into a ring (no concatenation copy)::

    header  <QII + nbuf*Q>: tid, number of out-of-band buffers, pickle length, buffer lengths
    pickle  the protocol-5 pickle of the payload
    buffers raw views of large buffers (numpy arrays, bytes, ...), not copied until the ring

Functions are pickled by reference when that works in any process (an importable module-level
function) and by value with cloudpickle otherwise (lambdas, closures, functions defined in
``__main__`` or a notebook cell), so they run under every start method.
"""
from __future__ import annotations

import pickle
import struct
import types
import weakref

import cloudpickle

_HEAD = struct.Struct("<QII")
#: buffers at least this big travel out of band (straight from their memory into the ring)
OOB_MIN = 32 * 1024


_by_value_cache = weakref.WeakKeyDictionary()  # function -> (fingerprint, pickle)


def _fingerprint(func):
    """What a by-value pickle of a plain function depends on, by identity: its code,
    defaults, closure cells' contents and the globals it names. (An object mutated in place
    keeps its identity: such a change is not seen, as under the fork start method.)"""
    try:
        names = _code_globals(func.__code__)
    except Exception:
        return None
    g = func.__globals__
    cells = tuple(c.cell_contents if _cell_full(c) else None for c in func.__closure__ or ())
    # the objects themselves (compared with `is`), so that their ids cannot be reused
    return (func.__code__, func.__defaults__, func.__kwdefaults__, *cells,
            *(g.get(n) for n in names))


def _cell_full(cell):
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _code_globals(code):
    from cloudpickle.cloudpickle import _extract_code_globals

    return tuple(_extract_code_globals(code))


def dumps_func(func) -> bytes:
    """Pickle a callable so that any worker (fork, forkserver, spawn) can load it."""
    module = getattr(func, "__module__", None)
    plain = isinstance(func, types.FunctionType)
    if module != "__main__" and not (plain and "<" in func.__qualname__):
        try:
            return pickle.dumps(func, 5)
        except Exception:
            pass
    if not plain:
        return cloudpickle.dumps(func, 5)
    # By value: cloudpickle costs tens of microseconds, so reuse the pickle while nothing
    # it captured has changed (an apply_async loop on a notebook function).
    fp = _fingerprint(func)
    hit = _by_value_cache.get(func)
    if fp is not None and hit is not None and len(hit[0]) == len(fp) and all(
        a is b for a, b in zip(hit[0], fp)
    ):
        return hit[1]
    data = cloudpickle.dumps(func, 5)
    if fp is not None:
        _by_value_cache[func] = (fp, data)
    return data


def dumps_by_value(obj) -> bytes:
    """cloudpickle: for one-off objects such as (initializer, initargs)."""
    return cloudpickle.dumps(obj, 5)


def encode(tid: int, obj) -> tuple:
    """The parts of a message carrying ``obj``; raises what pickling raises."""
    bufs = []

    def oob(pb):
        raw = pb.raw()
        if raw.nbytes < OOB_MIN:
            return True  # small: in band
        bufs.append(raw)
        return False

    try:
        data = pickle.dumps(obj, 5, buffer_callback=oob)
    except (pickle.PicklingError, AttributeError, TypeError):
        # e.g. a lambda among the arguments: by value; a truly unpicklable object raises again
        bufs.clear()
        data = cloudpickle.dumps(obj, 5, buffer_callback=oob)
    head = _HEAD.pack(tid, len(bufs), len(data))
    if bufs:
        head += struct.pack(f"<{len(bufs)}Q", *(b.nbytes for b in bufs))
    return (head, data, *bufs)


def parts_size(parts) -> int:
    """Bytes of the message stream for ``parts`` (with the channel's 8-byte length)."""
    return 8 + sum(memoryview(p).nbytes for p in parts)


def peek_tid(msg) -> int:
    return _HEAD.unpack_from(msg, 0)[0]


def decode(msg):
    """(tid, obj) from a received message (a bytearray; buffers are views into it)."""
    tid, nbuf, plen = _HEAD.unpack_from(msg, 0)
    mv = memoryview(msg)
    pos = _HEAD.size
    lens = struct.unpack_from(f"<{nbuf}Q", msg, pos) if nbuf else ()
    pos += 8 * nbuf
    data = mv[pos : pos + plen]
    pos += plen
    buffers = []
    for n in lens:
        buffers.append(mv[pos : pos + n])
        pos += n
    return tid, pickle.loads(data, buffers=buffers)
