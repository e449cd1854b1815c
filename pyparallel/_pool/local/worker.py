"""The worker's main loop: take a message from this worker's ring (GIL released while
waiting), run the task, put the result in the result ring. One task message is one chunk.

Everything a task does wrong is reported as that task's failure while the worker can still
send: an exception (BaseException included: ``sys.exit()`` in a task fails the task, it does
not end the worker), a function or arguments that cannot be unpickled here, a result that
cannot be pickled (``MaybeEncodingError``, as in multiprocessing).
"""
from __future__ import annotations

import itertools
import os
import pickle
import reprlib

import _signal

from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError

from ... import _core, _tunables
from .. import identity
from . import spill, wire

__all__ = ["main"]

# Made here, once, in the parent (a forked worker that made it would copy the pages of the
# pickler's code and data on first touch: every page a new worker writes costs it a copy)
_READY = wire.encode(wire.READY_TID, None)


def _run(func, args, kind, _pack_iter=_core.pack_iter):
    """The task's value: for a map's chunk, its results packed as they come when they are
    plain records (wire._Records), else their list."""
    if kind == wire.MAP:
        value = _pack_iter(map(func, args))
        return wire._Records(value) if type(value) is bytes else value
    if kind == wire.STARMAP:
        value = _pack_iter(itertools.starmap(func, args))
        return wire._Records(value) if type(value) is bytes else value
    if kind == wire.BULK:
        return func(list(args))
    a, kw = args
    return func(*a, **kw)


_END = object()


class _PartUnpicklable(Exception):
    """A part of a streamed chunk's results could not be pickled."""

    def __init__(self, err, value):
        super().__init__(err, value)
        self.err, self.value = err, value


def _run_streamed(func, args, kind, send, _pack=wire.pack_numbers):
    """As _run for a map chunk flagged STREAM: each full part of wire.PART_ITEMS results
    that more results follow is packed and handed to ``send(index, value)`` at once; the
    value returned is the rest (at least one item)."""
    it = map(func, args) if kind == wire.MAP else itertools.starmap(func, args)
    part = wire.PART_ITEMS
    index = 0
    items = []
    while True:
        items.extend(itertools.islice(it, part - len(items)))
        nxt = next(it, _END) if len(items) == part else _END
        if nxt is _END:
            return _pack(items, records=True)
        send(index, _pack(items, records=True))
        index += 1
        items = [nxt]


def _failure(e):
    return (False, ExceptionWithTraceback(e, e.__traceback__))


def _encode_result(tid, result):
    """The result message; a result that cannot be pickled fails with MaybeEncodingError."""
    try:
        return wire.encode(tid, result)
    except BaseException as e:  # noqa: BLE001 - a __reduce__ may raise anything
        err = e
    try:
        wrapped = MaybeEncodingError(err, result[1])
        return wire.encode(tid, (False, wrapped))
    except BaseException:  # noqa: BLE001 - the value's repr itself fails (too deep, say)
        wrapped = MaybeEncodingError(err, reprlib.repr(result[1]))
        return wire.encode(tid, (False, wrapped))


def _send_part(ch, slot, tid, index, value):
    try:
        parts = wire.encode(tid, value, flags=wire.PARTIAL | (index << wire.CLAIM_SHIFT))
    except BaseException as e:  # noqa: BLE001 - a __reduce__ may raise anything
        raise _PartUnpicklable(e, value) from None
    ch.send(slot, parts)


class _Functions:
    """The functions this worker was sent: kept as pickles, loaded when first used."""

    def __init__(self):
        self.pickles = {}
        self.loaded = {}

    def define(self, fid, data):
        self.pickles[fid] = data
        self.loaded.pop(fid, None)

    def get(self, fid):
        func = self.loaded.get(fid)
        if func is None:
            func = pickle.loads(self.pickles[fid])  # raises into the task that needs it
            self.loaded[fid] = func
        return func


def main(parent_pid, fd, pipe_fd, slot, init, maxtasks, threads=1, claims=None, gen=0):
    # Ctrl-C is the parent's business: it cancels calls and replaces workers itself.
    # (_signal's own signal(): signal.signal's conversion of the old handler to an enum
    # raises and catches a ValueError, a tenth of a forked worker's start-up)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    # Kernels run inside workers share the CPUs with the other workers: cores / workers each.
    if "OMP_NUM_THREADS" not in os.environ:  # (setdefault would raise and catch a KeyError)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    _core.set_default_threads(threads)
    try:
        ch = _core.Channel.attach(parent_pid, fd, pipe_fd)
    except OSError:  # the pool was torn down while this worker started: nothing to serve
        os._exit(3)
    claim_view = results_ok = result_segs = None
    if claims is not None:  # the words that say whether the parent took a queued task back
        cfd, cino, csize, per_slot, nslots, per_results = claims
        try:
            claim_seg = _core.Segment.attach(parent_pid, cfd, cino, csize)
        except OSError:
            os._exit(3)
        claim_view = _core.SharedView(claim_seg, slot * per_slot * 4, "i", per_slot, False)
        # and the one that says whether big results may go through segments of ours
        base = nslots * per_slot * 4
        results_ok = _core.SharedView(claim_seg, base, "i", 1, False)
        # and this slot's result segments' words (see spill.ResultSegments)
        result_segs = spill.ResultSegments(_core.SharedView(
            claim_seg, base + 4 + slot * per_results * 4, "i", per_results, False), per_results, gen)
        del claim_seg
    identity._set(identity.WorkerInfo(slot, os.getpid()))
    if init is not None:
        try:
            initializer, initargs = pickle.loads(init)
            initializer(*initargs)
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which gives up
            try:
                ch.send(slot, wire.encode(wire.INIT_FAILED_TID, _failure(e)[1]))
            except BaseException:  # noqa: BLE001
                ch.send(slot, wire.encode(wire.INIT_FAILED_TID, RuntimeError(repr(e))))
            os._exit(1)
    ch.send(slot, _READY)
    funcs = _Functions()
    spin_usec = _tunables.WORKER_SPIN_US
    spills = spill.SpillCache()
    done = 0
    parent_gone = False
    while maxtasks is None or done < maxtasks:
        try:
            msg = ch.recv(slot, spin_usec)
        except BrokenPipeError:  # the parent is gone: nothing to report to
            parent_gone = True
            break
        if not msg:  # an empty message asks the worker to leave
            break
        tid, flags = wire.peek(msg)
        if flags & wire.DEFINE:
            funcs.define(tid, wire.define_payload(msg))
            continue
        claim = flags >> wire.CLAIM_SHIFT
        if claim and not claim_view.compare_exchange(claim - 1, 0, 1):
            continue  # the parent took it back for another worker (queued -> stolen)
        seg = None
        try:
            (fid, args, kind), seg = wire.decode(msg, parent_pid, spills)[1:]
            del msg
            if flags & wire.STREAM:
                value = _run_streamed(funcs.get(fid), args, kind,
                                      lambda index, part: _send_part(ch, slot, tid, index, part))
            else:
                value = _run(funcs.get(fid), args, kind)
                if type(value) is list:  # a map's chunk of results, or a list from apply
                    value = wire.pack_numbers(value,
                                              records=kind != wire.MAP and kind != wire.STARMAP)
            result = (True, value)
            value = None
        except _PartUnpicklable as e:
            result = (False, MaybeEncodingError(e.err, e.value))
            e = None
        except BaseException as e:  # noqa: BLE001 - the task's failure, whatever it raised
            result = _failure(e)
            e = None
        args = None
        parts = _encode_result(tid, result)
        result = None
        if result_segs is not None:
            try:
                parts, word = result_segs.spill(parts, results_ok.load(0) == 1)
            except OSError:  # no memory for a segment: through the ring, then
                word = None
            if word is not None:
                parts = wire.with_claim(parts, word)
        # A spill segment the arguments came in goes back to the parent for reuse once no
        # view of it is left: before the result is sent when possible, so that the parent
        # finds it free. A task that keeps a view (in a global, say) keeps the segment, and
        # the parent does not reuse it.
        if seg is not None and spills.release(seg):
            seg = None
        try:
            ch.send(slot, parts)
        except BrokenPipeError:  # the parent died while we were running
            parent_gone = True
            break
        parts = None
        if seg is not None:
            spills.release(seg)  # the result was a view of it
            seg = None
        done += 1
    spills.close()
    if result_segs is not None:
        if parent_gone:
            result_segs.close()
        else:  # the parent maps the last results' segments while we still hold them
            result_segs.wait(_tunables.KILL_JOIN)
    claim_view = results_ok = None
    ch.close()
