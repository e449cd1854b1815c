"""The message format of the local engine's rings.

A message is a tuple of parts written back to back into a ring (no concatenation copy)::

    header  <QIII + nbuf*Q>: tid, number of out-of-band buffers, pickle length, flags,
            buffer lengths; with SPILLED also <iQQ> (the segment) + nbuf*Q (offsets in it)
    pickle  the protocol-5 pickle of the payload
    buffers raw views of large buffers (numpy arrays, bytes, ...), not copied until the ring;
            absent when SPILLED: :mod:`.spill` copied them into a shared segment instead

Messages, parent to worker:

- a **task**: payload ``(fid, args, kind)``; ``fid`` names a function the worker was sent;
- a **definition** (flag DEFINE, tid = fid): the "pickle" part is the function's own pickle,
  which the worker keeps and loads when a task first needs it (a load that raises fails that
  task, not the worker);
- an empty message: leave.

A task names a **claim word** (flags from bit CLAIM_SHIFT): before running it the worker
moves that word from QUEUED to TAKEN, and a parent that took the task back to run it on an
idle worker moved it to STOLEN first, so exactly one of them has it (the worker skips a stolen
task's message).

A map chunk longer than PART_ITEMS is sent with flag STREAM: its worker sends the results in
parts of PART_ITEMS items (flag PARTIAL, the part's index in the flags from bit 8, payload the
list of results), each as soon as it is computed and followed by at least one more item; the
chunk's result message then carries only the items after the parts.

Worker to parent: a **result**, payload ``(success, value)`` for the task ``tid``, pickled
with plain pickle as multiprocessing does (big out-of-band buffers SPILLED into a segment of
the worker's, which the parent maps and keeps: see :class:`.spill.ResultSegments`); ``tid`` READY_TID says the worker started (its
initializer ran), INIT_FAILED_TID reports an initializer that raised.

Long lists of plain numbers (a chunk of a map's arguments or results) travel as packed
arrays, and long lists of plain records (tuples of ints, floats, strs, None and bools, the
same kind per field) or of strs as one packed buffer (:func:`pack_numbers`, codec.c).
"""
from __future__ import annotations

import itertools
import pickle
import struct

from ... import _core, _tunables

HEAD = struct.Struct("<QIII")  # tid, out-of-band buffers, pickle length, flags
#: flag: the out-of-band buffers are in a shared segment, not in the message
SPILLED = 1
#: flag: a function definition, not a task
DEFINE = 2
#: flag (task): the parent takes this map chunk's results in parts (see PART_ITEMS)
STREAM = 4
#: flag (result): a part of a streamed chunk's results, its index in the flags from bit 8
PARTIAL = 8
#: a task's claim word (1 + its index in the worker slot's claims), in the flags from bit 8
CLAIM_SHIFT = 8
#: a streamed chunk's results come in parts of this many items (the last part, which has at
#: least one item, comes as the chunk's result): the parent unpacks each part while the
#: worker computes the next, instead of the whole chunk's results after it finished
PART_ITEMS = 8192
SPILL_HEAD = struct.Struct("<iQQ")  # the segment: fd in the process that sent it, inode, size

#: tid of the message a worker sends when its initializer failed
INIT_FAILED_TID = (1 << 64) - 1
#: tid of the message a worker sends once it started (its initializer ran)
READY_TID = (1 << 64) - 2

#: the kinds of task (see pyparallel._pool.backend)
from ..backend import APPLY, BULK, MAP, STARMAP  # noqa: E402,F401


class _Numbers:
    """Stands in for a list of plain numbers in a pickle: it pickles as a packed int64 or
    float64 array (out of band when large) and unpickles as the equal list (codec.c)."""

    __slots__ = ("code", "data")

    def __init__(self, code, data):
        self.code = code
        self.data = data

    def __reduce__(self):
        return _core.unpack_numbers, (self.code, pickle.PickleBuffer(self.data))


class _Records:
    """Stands in for a list of plain records (or strs) in a pickle: one packed buffer (out of
    band when large), unpickled as the equal list of new tuples (codec.c)."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return _core.unpack_records, (pickle.PickleBuffer(self.data),)


class _RecordsIter(_Records):
    """The same for a chunk of arguments: unpickled as an iterator over the records, which
    unpacks them a part at a time as the worker's function takes them."""

    __slots__ = ()

    def __reduce__(self):
        return iter_records, (pickle.PickleBuffer(self.data),)


def _record_parts(buf, _unpack=_core.unpack_records):
    part = _tunables.RECORDS_PART
    state = None
    while True:
        items, state = _unpack(buf, state, part)
        yield items
        if state is None:
            return


def iter_records(buf):
    """An iterator over the records pack_records packed into ``buf`` (unpacked a part at a
    time; a malformed buffer raises ValueError as it is reached)."""
    return itertools.chain.from_iterable(_record_parts(buf))


def _packed(seq, start, stop, records, _pack_numbers=_core.pack_numbers,
            _pack_records=_core.pack_records):
    """seq[start:stop] packed (see codec.c) as _Numbers, or as ``records`` (a stand-in class,
    or None: not as records); None when it is too short or does not pack."""
    if stop - start >= _tunables.PACK_MIN:
        packed = _pack_numbers(seq, start, stop)
        if packed is not None:
            return _Numbers(*packed)
        packed = _pack_records(seq, start, stop) if records is not None else None
        if packed is not None:
            return records(packed)
    return None


def pack_args(seq, start=0, stop=None):
    """As :func:`pack_numbers`, for a chunk of arguments the worker only iterates over once
    (records unpickle as an iterator, see :class:`_RecordsIter`): ``seq``'s items
    ``start .. stop-1``, read in place (no reference is taken to each, so under fork the
    pages the workers share with the parent stay shared); a tuple of them when they do not
    pack (``seq`` itself when it is the whole of it)."""
    whole = start == 0 and stop is None
    packed = _packed(seq, start, len(seq) if stop is None else stop, _RecordsIter)
    if packed is not None:
        return packed
    return seq if whole else tuple(seq[start:stop])


#: what pack_args packs into
PACKED = (_Numbers, _RecordsIter)


def pack_numbers(seq, records=True):
    """``seq`` itself, or for a long list or tuple of only exact ints (within int64) or only
    exact floats, or (``records``) of plain records (see codec.c), a stand-in that pickles it
    several times faster. It unpickles as a list: use it only where a list is what the
    receiver needs."""
    packed = _packed(seq, 0, len(seq), _Records if records else None)
    return seq if packed is None else packed


def _header(tid, bufs, plen, flags):
    head = HEAD.pack(tid, len(bufs), plen, flags)
    if bufs:
        head += struct.pack(f"<{len(bufs)}Q", *(b.nbytes for b in bufs))
    return head


def encode(tid: int, obj, dumps=None, flags=0) -> tuple:
    """The parts of a message carrying ``obj``; raises what pickling raises. ``dumps``:
    pickle with this function (taking ``buffer_callback=``) instead of plain pickle."""
    bufs = []
    oob_min = _tunables.OOB_MIN

    def oob(pb):
        raw = pb.raw()
        if raw.nbytes < oob_min:
            return True  # small: in band
        bufs.append(raw)
        return False

    if dumps is None:
        data = pickle.dumps(obj, 5, buffer_callback=oob)
    else:
        data = dumps(obj, buffer_callback=oob)
    return (_header(tid, bufs, len(data), flags), data, *bufs)


def with_claim(parts, claim: int) -> tuple:
    """The same message, its flags naming claim word ``claim`` (see engine: stealing)."""
    head = parts[0]
    tid, nbuf, plen, flags = HEAD.unpack_from(head, 0)
    flags = (flags & ((1 << CLAIM_SHIFT) - 1)) | ((claim + 1) << CLAIM_SHIFT)
    return (HEAD.pack(tid, nbuf, plen, flags) + head[HEAD.size:], *parts[1:])


def encode_define(fid: int, func_pickle: bytes) -> tuple:
    return (HEAD.pack(fid, 0, len(func_pickle), DEFINE), func_pickle)


def parts_size(parts) -> int:
    """Bytes of the message stream for ``parts`` (with the channel's 8-byte length). The
    parts are bytes and 1-D byte memoryviews (PickleBuffer.raw()), whose len() is their size."""
    return 8 + sum(map(len, parts))


def peek(msg) -> tuple:
    """(tid, flags) of a received message."""
    tid, _, _, flags = HEAD.unpack_from(msg, 0)
    return tid, flags


def spill_ref(msg) -> tuple:
    """(fd, inode, size) of the segment a SPILLED message's buffers are in."""
    _, nbuf, _, _ = HEAD.unpack_from(msg, 0)
    return SPILL_HEAD.unpack_from(msg, HEAD.size + 8 * nbuf)


def peek_tid(msg) -> int:
    return HEAD.unpack_from(msg, 0)[0]


def define_payload(msg) -> bytes:
    """The function pickle of a DEFINE message."""
    _, _, plen, _ = HEAD.unpack_from(msg, 0)
    return bytes(memoryview(msg)[HEAD.size:HEAD.size + plen])


def decode(msg, pid=None, cache=None):
    """(tid, obj, segment) from a received message (a bytearray; buffers are views into it,
    or into the spill segment, mapped through ``cache``, that process ``pid`` sent)."""
    tid, nbuf, plen, flags = HEAD.unpack_from(msg, 0)
    mv = memoryview(msg)
    pos = HEAD.size
    lens = struct.unpack_from(f"<{nbuf}Q", msg, pos) if nbuf else ()
    pos += 8 * nbuf
    seg = None
    if flags & SPILLED:
        fd, ino, size = SPILL_HEAD.unpack_from(msg, pos)
        pos += SPILL_HEAD.size
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
