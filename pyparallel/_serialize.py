"""Message encoding for the pool's channel: pickle protocol 5 with out-of-band buffers.

A message is a tuple of parts written back to back into a ring (no concatenation copy)::

    header  <QII + nbuf*Q>: tid, number of out-of-band buffers, pickle length, buffer lengths
    pickle  the protocol-5 pickle of the payload
    buffers raw views of large buffers (numpy arrays, bytes, ...), not copied until the ring

Long lists of plain numbers (a chunk of a map's arguments or results) travel as packed arrays
(:func:`pack_numbers`). Functions are pickled by reference when that works in any process (an importable module-level
function) and by value with cloudpickle otherwise (lambdas, closures, functions defined in
``__main__`` or a notebook cell), so they run under every start method.
"""
from __future__ import annotations

import pickle
import struct
import types
import weakref

from . import _core


_HEAD = struct.Struct("<QII")
#: buffers at least this big travel out of band (straight from their memory into the ring)
OOB_MIN = 32 * 1024


#: lists of plain numbers at least this long travel packed (see pack_numbers)
PACK_MIN = 64


class _Numbers:
    """Stands in for a list of plain numbers in a pickle: it pickles as a packed int64 or
    float64 array (out of band when large) and unpickles as the equal list (codec.c)."""

    __slots__ = ("code", "data")

    def __init__(self, code, data):
        self.code = code
        self.data = data

    def __reduce__(self):
        return _core.unpack_numbers, (self.code, pickle.PickleBuffer(self.data))


def pack_numbers(seq):
    """``seq`` itself, or for a long list or tuple of only exact ints (within int64) or only
    exact floats, a stand-in that pickles it several times faster. It unpickles as a list:
    use it only where a list is what the receiver needs."""
    if len(seq) >= PACK_MIN:
        packed = _core.pack_numbers(seq)
        if packed is not None:
            return _Numbers(*packed)
    return seq


_by_value_cache = weakref.WeakKeyDictionary()  # function -> (captured objects, names, pickle)


def _captured(func, names):
    """What a by-value pickle of a plain function depends on: its code, defaults, closure
    cells' contents and the globals it names. The cache compares them by identity (an object
    mutated in place keeps its identity: such a change is not seen, as under fork)."""
    g = func.__globals__
    out = [func.__code__, func.__defaults__, func.__kwdefaults__]
    for c in func.__closure__ or ():
        try:
            out.append(c.cell_contents)
        except ValueError:  # an empty cell
            out.append(_cell_full)
    for n in names:
        out.append(g.get(n, _cell_full))
    return out


def _cell_full():  # a marker: never a real global or cell value
    pass


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
        return _cloudpickle().dumps(func, 5)
    # By value: cloudpickle costs tens of microseconds, so reuse the pickle while nothing
    # it captured has changed (an apply_async loop on a notebook function).
    hit = _by_value_cache.get(func)
    if hit is not None and hit[0][0] is func.__code__:
        now = _captured(func, hit[1])
        if len(now) == len(hit[0]) and all(a is b for a, b in zip(now, hit[0])):
            return hit[2]
    data = _cloudpickle().dumps(func, 5)
    try:
        names = _code_globals(func.__code__)
        _by_value_cache[func] = (_captured(func, names), names, data)
    except Exception:
        pass
    return data


def _cloudpickle():
    # imported when first needed: workers load by-value pickles without it imported here
    import cloudpickle

    return cloudpickle


def dumps_by_value(obj) -> bytes:
    """cloudpickle: for one-off objects such as (initializer, initargs)."""
    return _cloudpickle().dumps(obj, 5)


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
        data = _cloudpickle().dumps(obj, 5, buffer_callback=oob)
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
