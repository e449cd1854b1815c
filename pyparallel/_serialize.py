"""Message encoding for the pool's channel: pickle protocol 5 with out-of-band buffers.

A message is a tuple of parts written back to back into a ring (no concatenation copy)::

    header  <QIII + nbuf*Q>: tid, number of out-of-band buffers, pickle length, flags,
            buffer lengths; with SPILLED also <iQQ> (the segment) + nbuf*Q (offsets in it)
    pickle  the protocol-5 pickle of the payload
    buffers raw views of large buffers (numpy arrays, bytes, ...), not copied until the ring;
            absent when SPILLED: :func:`spill` copied them into a shared segment instead

Long lists of plain numbers (a chunk of a map's arguments or results) travel as packed arrays
(:func:`pack_numbers`). Functions are pickled by reference when that works in any process (an
importable module-level function) and by value with cloudpickle otherwise (lambdas, closures,
functions defined in ``__main__`` or a notebook cell), so they run under every start method.
"""
from __future__ import annotations

import pickle
import struct
import types
import weakref

from . import _core


_HEAD = struct.Struct("<QIII")  # tid, out-of-band buffers, pickle length, flags
#: flag: the out-of-band buffers are in a shared segment, not in the message
SPILLED = 1
_SPILL = struct.Struct("<iQQ")  # the segment: fd in the process that sent it, inode, size
#: buffers at least this big travel out of band (straight from their memory into the ring)
OOB_MIN = 32 * 1024
#: a task whose out-of-band buffers add up to this much has them copied into a shared segment
#: that the worker maps and unpickles from: one copy in all, not one into the ring and one out
SPILL_MIN = 1 << 20
#: where data starts in a spill segment. Its first 32-bit word says who may touch it:
SPILL_DATA = 64
SPILL_FREE, SPILL_BUSY, SPILL_EVICTED = 0, 1, 2  # parent may write / a task has it / unused


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
    head = _HEAD.pack(tid, len(bufs), len(data), 0)
    if bufs:
        head += struct.pack(f"<{len(bufs)}Q", *(b.nbytes for b in bufs))
    return (head, data, *bufs)


def parts_size(parts) -> int:
    """Bytes of the message stream for ``parts`` (with the channel's 8-byte length). The
    parts are bytes and 1-D byte memoryviews (PickleBuffer.raw()), whose len() is their size."""
    return 8 + sum(map(len, parts))


def _aligned(n):
    return (n + 63) & ~63


def spill_size(parts) -> int:
    """The segment size :func:`spill` needs for ``parts``, or 0 when it is not worth it."""
    sizes = [len(p) for p in parts[2:]]  # byte views: see parts_size
    if sum(sizes) < SPILL_MIN:
        return 0
    return SPILL_DATA + sum(_aligned(n) for n in sizes)


def spill(parts, seg) -> tuple:
    """The parts of the same message with its out-of-band buffers copied into ``seg`` (a
    Segment of at least spill_size(parts) bytes): a header and the pickle."""
    head = parts[0]
    tid, nbuf, plen, flags = _HEAD.unpack_from(head, 0)
    lens = struct.unpack_from(f"<{nbuf}Q", head, _HEAD.size)
    offsets = []
    off = SPILL_DATA
    for buf, n in zip(parts[2:], lens):
        seg.write(off, buf)
        offsets.append(off)
        off += _aligned(n)
    head = (_HEAD.pack(tid, nbuf, plen, flags | SPILLED) + head[_HEAD.size:]
            + _SPILL.pack(seg.fd, seg.ino, seg.size) + struct.pack(f"<{nbuf}Q", *offsets))
    return (head, parts[1])


def peek_tid(msg) -> int:
    return _HEAD.unpack_from(msg, 0)[0]


class SpillCache:
    """A worker's mappings of its parent's spill segments, kept from task to task: mapping a
    segment afresh would fault in every page of it again. The parent marks a segment it no
    longer uses SPILL_EVICTED; the cache then lets go of it."""

    MAX = 16

    def __init__(self):
        self.maps = {}  # inode -> Segment

    def attach(self, pid, fd, ino, size):
        for old_ino, old in list(self.maps.items()):
            if old.load32(0) == SPILL_EVICTED:
                self._drop(old_ino)
        seg = self.maps.pop(ino, None)
        if seg is not None and seg.size < size:
            seg.close()
            seg = None
        if seg is None:
            seg = _core.Segment.attach(pid, fd, ino, size)
            while len(self.maps) >= self.MAX:
                self._drop(next(iter(self.maps)))
        self.maps[ino] = seg  # the most recently used last
        return seg

    def release(self, seg):
        """After a task: True when no view of seg is left (the parent may reuse it); False
        when the task kept one, and then this cache forgets it (the views keep it mapped)."""
        if seg.release(0):
            return True
        if self.maps.get(seg.ino) is seg:
            del self.maps[seg.ino]
        return False

    def _drop(self, ino):
        seg = self.maps.pop(ino)
        try:
            seg.close()
        except BufferError:  # still viewed: unmapped when the last view goes
            pass

    def close(self):
        while self.maps:
            self._drop(next(iter(self.maps)))


def _decode(msg, pid, cache=None):
    tid, nbuf, plen, flags = _HEAD.unpack_from(msg, 0)
    mv = memoryview(msg)
    pos = _HEAD.size
    lens = struct.unpack_from(f"<{nbuf}Q", msg, pos) if nbuf else ()
    pos += 8 * nbuf
    seg = None
    if flags & SPILLED:
        fd, ino, size = _SPILL.unpack_from(msg, pos)
        pos += _SPILL.size
        offsets = struct.unpack_from(f"<{nbuf}Q", msg, pos)
        pos += 8 * nbuf
    data = mv[pos : pos + plen]
    if flags & SPILLED:
        seg = cache.attach(pid, fd, ino, size)
        view = memoryview(seg)
        buffers = [view[o : o + n] for o, n in zip(offsets, lens)]
        del view
    else:
        pos += plen
        buffers = []
        for n in lens:
            buffers.append(mv[pos : pos + n])
            pos += n
    try:
        return tid, pickle.loads(data, buffers=buffers), seg
    except BaseException:
        del buffers
        if seg is not None:
            cache.release(seg)
        raise


def decode(msg):
    """(tid, obj) from a received message (a bytearray; buffers are views into it)."""
    tid, obj, _ = _decode(msg, None)
    return tid, obj


def decode_task(msg, pid, cache):
    """(obj, segment) from a task message sent by process ``pid``. With a spill segment
    (mapped through ``cache``, a SpillCache) the buffers are views of it: once they are
    gone, ``cache.release(segment)`` hands it back."""
    _, obj, seg = _decode(msg, pid, cache)
    return obj, seg
