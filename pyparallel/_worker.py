"""The pool worker's main loop: take a task from this worker's ring (GIL released while
waiting), run it, put the result in the result ring. One task message is one chunk."""
from __future__ import annotations

import itertools
import os
import pickle
import signal

from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError

from . import _core, _serialize

#: tid of the message a worker sends when its initializer failed
INIT_FAILED_TID = (1 << 64) - 1

APPLY, MAP, STARMAP = 0, 1, 2


def _run(func, args, kind):
    if kind == MAP:
        return list(map(func, args))
    if kind == STARMAP:
        return list(itertools.starmap(func, args))
    a, kw = args
    return func(*a, **kw)


def main(parent_pid, fd, pipe_fd, slot, init, maxtasks, threads=1):
    # Ctrl-C is the parent's business: it terminates the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Kernels run inside workers share the CPUs with the other workers: cores / workers each.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _core.set_default_threads(threads)
    ch = _core.Channel.attach(parent_pid, fd, pipe_fd)
    if init is not None:
        try:
            initializer, initargs = pickle.loads(init)
            initializer(*initargs)
        except BaseException as e:
            ch.send(slot, _serialize.encode(INIT_FAILED_TID, ExceptionWithTraceback(e, e.__traceback__)))
            os._exit(1)
    cached_fb = None
    func = None
    spills = _serialize.SpillCache()
    done = 0
    while maxtasks is None or done < maxtasks:
        try:
            msg = ch.recv(slot)
        except BrokenPipeError:  # the parent is gone: nothing to report to
            break
        if not msg:  # an empty message asks the worker to leave
            break
        tid = _serialize.peek_tid(msg)
        seg = None
        try:
            (fb, args, kind), seg = _serialize.decode_task(msg, parent_pid, spills)
            del msg
            if fb != cached_fb:
                func = pickle.loads(fb)
                cached_fb = fb
            value = _run(func, args, kind)
            if type(value) is list:  # a map's chunk of results, or a list from apply
                value = _serialize.pack_numbers(value)
            result = (True, value)
            value = None
        except Exception as e:
            result = (False, ExceptionWithTraceback(e, e.__traceback__))
        args = None
        try:
            parts = _serialize.encode(tid, result)
        except Exception as e:
            wrapped = MaybeEncodingError(e, result[1])
            parts = _serialize.encode(tid, (False, wrapped))
        result = None
        # A spill segment the arguments came in goes back to the parent for reuse once no
        # view of it is left: before the result is sent when possible, so that the parent
        # finds it free. A task that keeps a view (in a global, say) keeps the segment, and
        # the parent does not reuse it.
        if seg is not None and spills.release(seg):
            seg = None
        try:
            ch.send(slot, parts)
        except BrokenPipeError:  # the parent died while we were running
            break
        parts = None
        if seg is not None:
            spills.release(seg)  # the result was a view of it
            seg = None
        done += 1
    spills.close()
    ch.close()
