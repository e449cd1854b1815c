"""Spill segments: big task buffers copied once into shared memory the worker maps.

A task whose out-of-band buffers add up to ``SPILL_MIN`` or more has them copied into a shared
segment (:class:`SpillPool`, the parent's); the worker maps it (:class:`SpillCache`, kept from
task to task: mapping afresh faults in every page again) and unpickles from it in place.

The segment's first 32-bit word says who may touch it:

- FREE: the parent may write it (the worker has no view of it left);
- BUSY: from the moment it is given to a task until the worker let go of every view;
- EVICTED: the parent stopped using it; a worker that still maps it lets go at its next task.

A segment still BUSY after its task completed is referenced in the worker (the task kept a
view, in a global say) and is never written again.

Results go the other way (:class:`ResultSegments`): a result whose out-of-band buffers add up
to ``RESULT_SPILL_MIN`` or more has them copied into a segment of the worker's; the parent
maps it as soon as it takes the message and unpickles from it in place, so the arrays it
returns are views of that segment, which lives as long as they do; once they are gone the
worker writes the next result into it (a fresh segment costs a page fault per page).
"""
from __future__ import annotations

import struct

from ... import _core, _tunables
from . import wire

#: where data starts in a segment
DATA = 64
FREE, BUSY, EVICTED = 0, 1, 2


def _aligned(n):
    return (n + 63) & ~63


def size_for(parts) -> int:
    """The segment size :func:`spill` needs for ``parts``, or 0 when it is not worth it."""
    if len(parts) <= 2:
        return 0
    sizes = [len(p) for p in parts[2:]]  # byte views: see wire.parts_size
    if sum(sizes) < _tunables.SPILL_MIN:
        return 0
    return DATA + sum(_aligned(n) for n in sizes)


def spill(parts, seg) -> tuple:
    """The parts of the same message with its out-of-band buffers copied into ``seg`` (a
    Segment of at least size_for(parts) bytes): a header and the pickle."""
    head = parts[0]
    tid, nbuf, plen, flags = wire.HEAD.unpack_from(head, 0)
    lens = struct.unpack_from(f"<{nbuf}Q", head, wire.HEAD.size)
    offsets = []
    off = DATA
    for buf, n in zip(parts[2:], lens):
        seg.write(off, buf)
        offsets.append(off)
        off += _aligned(n)
    head = (wire.HEAD.pack(tid, nbuf, plen, flags | wire.SPILLED) + head[wire.HEAD.size:]
            + wire.SPILL_HEAD.pack(seg.fd, seg.ino, seg.size) + struct.pack(f"<{nbuf}Q", *offsets))
    return (head, parts[1])


class SpillPool:
    """The parent's segments, reused: a new segment costs page faults as it is first written,
    a reused one only the copy."""

    def __init__(self, keep):
        self.keep = keep
        self.free = []

    def spill(self, parts):
        """(message parts to write, segment or None) for a task's parts."""
        need = size_for(parts)
        if not need:
            return parts, None
        seg = self._take(need)
        try:
            return spill(parts, seg), seg
        except BaseException:
            seg.close()
            raise

    def _take(self, size):
        for i, seg in enumerate(self.free):
            if size <= seg.size <= 2 * size and seg.load32(0) == FREE:
                del self.free[i]
                break
        else:
            r = _tunables.SPILL_ROUND
            seg = _core.Segment(-(-size // r) * r)
        seg.store32(0, BUSY)
        return seg

    def give(self, seg, worker_gone=False):
        """Back from a completed task (or from a worker that died: nothing maps it now)."""
        if worker_gone:
            seg.store32(0, FREE)
        self.free.append(seg)
        total = sum(s.size for s in self.free)
        while self.free and (len(self.free) > self.keep or total > _tunables.SPILL_KEEP_BYTES):
            old = self.free.pop(0)
            total -= old.size
            evict(old)

    def close(self):
        for seg in self.free:
            evict(seg)
        self.free.clear()


def evict(seg):
    """Stops using seg; workers that keep it mapped let go of it at their next task."""
    seg.store32(0, EVICTED)
    seg.close()


class SpillCache:
    """A worker's mappings of its parent's segments, kept from task to task."""

    def __init__(self):
        self.maps = {}  # inode -> Segment

    def attach(self, pid, fd, ino, size):
        for old_ino, old in list(self.maps.items()):
            if old.load32(0) == EVICTED:
                self._drop(old_ino)
        seg = self.maps.pop(ino, None)
        if seg is not None and seg.size < size:
            seg.close()
            seg = None
        if seg is None:
            seg = _core.Segment.attach(pid, fd, ino, size)
            while len(self.maps) >= _tunables.SPILL_CACHE_MAX:
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


#: a result segment's word (in the engine's claims segment): generation * 4 + one of these
R_FREE, R_SENT, R_MAPPED = 0, 1, 2


class ResultSegments:
    """A worker's result segments, reused once the parent let go of them.

    Each has a word in the pool's shared claims segment: FREE (0: the worker may write it),
    ``gen*4 + R_SENT`` (sent; the parent has not mapped it yet: the worker must not exit),
    ``gen*4 + R_MAPPED`` (the parent's results use it); the parent moves SENT to MAPPED when
    it maps it and MAPPED to FREE when its last view is gone, each by compare-and-exchange
    on this worker's generation, so a finalizer late for a replaced worker changes nothing.
    """

    def __init__(self, words, n, gen):
        self.words = words  # a SharedView of this slot's n words
        self.n = n
        self.gen = gen
        self.segs = {}  # word index -> Segment
        for i in range(self.n):
            words.store(i, R_FREE)

    def _pick(self, need):
        words = self.words
        spare = None
        for i, seg in self.segs.items():
            if words.load(i) == R_FREE:
                if need <= seg.size <= 2 * need:
                    return i, seg
                spare = i
        for i in range(self.n):
            if i not in self.segs:
                return i, None
        if spare is not None:
            self.segs.pop(spare).close()
            return spare, None
        return None, None

    def spill(self, parts, allowed=True):
        """(parts, word index or None): the result message's parts with its big buffers
        moved into a segment when that pays and ``allowed`` (the parent does not hold too
        many already)."""
        if not allowed or len(parts) <= 2:
            return parts, None
        sizes = [len(p) for p in parts[2:]]
        if sum(sizes) < _tunables.RESULT_SPILL_MIN:
            return parts, None
        need = DATA + sum(_aligned(n) for n in sizes)
        i, seg = self._pick(need)
        if i is None:
            return parts, None
        if seg is None:
            r = _tunables.SPILL_ROUND
            seg = _core.Segment(-(-need // r) * r)
            self.segs[i] = seg
        self.words.store(i, self.gen * 4 + R_SENT)
        try:
            return spill(parts, seg), i
        except BaseException:
            self.words.store(i, R_FREE)
            raise

    def wait(self, seconds):
        """Before the worker exits: give the parent time to map what it was sent."""
        import time

        end = time.monotonic() + seconds
        words = self.words
        while any(words.load(i) & 3 == R_SENT for i in self.segs):
            if time.monotonic() >= end:
                break
            time.sleep(0.001)
        self.close()

    def close(self):
        for seg in self.segs.values():
            seg.close()
        self.segs.clear()
        self.words = None
