"""Queues and pipes between processes on shared memory: drop-ins for multiprocessing's
``Queue``, ``JoinableQueue``, ``SimpleQueue`` and ``Pipe``.

::

    import pyparallel as pp
    q = pp.Queue()                      # or pp.JoinableQueue(), pp.SimpleQueue(), Queue(maxsize)
    q.put(obj); q.get(timeout=1.0)      # queue.Full / queue.Empty as multiprocessing
    a, b = pp.Pipe()                    # Connections: send/recv, send_bytes/recv_bytes, poll

What is different from multiprocessing (and why it is safe to switch):

- **No feeder thread.** When ``put`` returns, the item is in shared memory: a producer that
  exits (or is killed) right after ``put`` loses nothing. ``qsize()`` is exact everywhere.
  An item that cannot be pickled is dropped and passed to ``Queue._on_queue_feeder_error(e,
  obj)`` (which prints the traceback), as multiprocessing's feeder thread does, but in
  ``put`` itself; later puts go on.
- **Pickled by handle.** A queue or a Connection can be passed as an argument to ``pp.Pool``
  or ``multiprocessing.Pool`` tasks, to ``multiprocessing.Process`` or ``pp.Process`` under any
  start method, put on another queue, or inherited under fork. (multiprocessing refuses this
  with "Queue objects should only be shared between processes through inheritance".) As with
  ``pp.Value``, the process that pickles a queue must keep it alive until it is unpickled;
  a Connection's fds travel as multiprocessing sends its own (``reduction.DupFd``), so its
  sender may close it right after sending it.
- **Survives a killed peer.** A producer or consumer killed (SIGKILL) in the middle of a put
  or get never wedges the queue: its lock is taken over within about 5 ms and at most the one
  message it was moving is lost; ``qsize()`` stays right.
- **Messages of any size.** Up to 64 KiB a message is copied into the ring; a bigger one goes
  into a shared region of its own (one copy), and the receiver reads it in place: numpy
  arrays sent with protocol-5 out-of-band buffers arrive as views of that region, which is
  returned to the system when the last of them is gone. Nothing is ever rejected for size.

The rings are in ``src/queue.c``; its header comment has the commit protocol that keeps the
state consistent at every point a process can die. Blocking waits release the GIL, honour their
timeout and let Ctrl-C through. An unbounded queue holds up to 4 GiB of pending small messages
(and any number of big ones); past that, ``put`` waits as on a full bounded queue. Like
multiprocessing's, ``put`` never waits on bytes unless asked: ``Queue(maxbytes=N)`` (pyparallel's
own keyword) makes it wait while the queue is not empty and would hold more than N unread bytes.
A Pipe's ``send`` waits while the other end has more than ``_PIPE_MAX_UNREAD`` bytes unread
(multiprocessing's waits on its socket buffer), and fails with BrokenPipeError once the other
end is closed everywhere, giving back what no one will read.

A Pipe's end is a ring for the data plus an fd that carries one byte per message: as under
multiprocessing, a socketpair's socket for a duplex Pipe (so ``reduction.send_handle`` and
``recv_handle`` pass fds over ``fileno()``) and an OS pipe's end for a one-way one. It is
``fileno()`` (for ``multiprocessing.connection.wait`` and ``select``), and it reports
end-of-file when every holder of the other end closed it or died. A duplex end's sends wait
while the socket holds as many unread messages as its buffer takes (a few hundred; the
system's ``net.core.wmem_max`` caps it), as multiprocessing's do.
"""
from __future__ import annotations

import collections
import copyreg
import errno
import fcntl
import os
import pickle
import queue as _queue
import select
import socket
import sys
import termios
import weakref
import multiprocessing.context as _mpctx
import multiprocessing.reduction as _reduction
from multiprocessing import BufferTooShort
from multiprocessing.reduction import ForkingPickler

from . import _core

__all__ = ["Queue", "JoinableQueue", "SimpleQueue", "Pipe", "Connection"]

_SEM_VALUE_MAX = 2147483647   # what multiprocessing reports as an unbounded queue's maxsize
_TAG_PICKLE = 0
_TAG_BYTES = 1    # Pipe.send_bytes: raw data
_TAG_RAW = 2      # Queue.put of an exact bytes object: sent as is, received as bytes
_PLAIN = frozenset((int, float, str, bytes, bool, type(None)))
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_RECV_SPIN_S = 50e-6   # how long recv waits on the ring before it sleeps on the fd
# A Pipe's send waits while the other end has more than this many bytes unread (what a
# socket's buffer does under multiprocessing's Pipe); one message bigger than that goes once
# the earlier ones were read.
_PIPE_MAX_UNREAD = 64 << 20
_SEND_SLICE_S = 0.1    # a blocked send checks this often that the other end is still open


class _Pickler(pickle.Pickler):
    # ForkingPickler's reducers, seen live (ForkingPickler.register may add more later);
    # ForkingPickler itself does not take buffer_callback.
    dispatch_table = collections.ChainMap(ForkingPickler._extra_reducers, copyreg.dispatch_table)


_pdumps = pickle.dumps
_ploads = pickle.loads


class _Sink:
    """A pickler's file: keeps what it writes (no copy, unlike io.BytesIO.getvalue)."""
    __slots__ = ("write",)


_picklers = []   # idle (pickler, chunks, buffers) triples: making a pickler costs a microsecond


def _new_pickler():
    chunks, bufs = [], []
    sink = _Sink()
    sink.write = chunks.append
    return _Pickler(sink, 5, buffer_callback=bufs.append), chunks, bufs


def _dumps(obj):
    """The parts of a message: a protocol-5 pickle, then its out-of-band buffers (or the
    pickle alone, not in a list). Pickled with multiprocessing's ForkingPickler reducers (as
    in its Queue) by a pickler taken from a pool (pop and append are atomic, and a nested or
    concurrent call takes another one); one that failed is dropped."""
    if type(obj) in _PLAIN:
        return _pdumps(obj, 5)
    try:
        st = _picklers.pop()
    except IndexError:
        st = _new_pickler()
    p, chunks, bufs = st
    p.dump(obj)              # on an error the pickler is dropped, not reused
    p.clear_memo()           # drops the references the memo holds
    # (a big bytes-like payload is written as the object itself: join copies it now)
    data = chunks[0] if len(chunks) == 1 and type(chunks[0]) is bytes else b"".join(chunks)
    chunks.clear()
    if bufs:
        parts = [data] + [b.raw() for b in bufs]
        bufs.clear()
    else:
        parts = data
    _picklers.append(st)
    return parts


def _loads(parts):
    if len(parts) == 1:
        return _ploads(parts[0])
    return _ploads(parts[0], buffers=parts[1:])


def _unpack(msg):
    """The object in a message taken off a queue's ring."""
    tag, parts = msg
    if tag == _TAG_RAW:
        data = parts[0]
        return data if type(data) is bytes else bytes(data)
    if len(parts) == 1:
        return _ploads(parts[0])
    return _ploads(parts[0], buffers=parts[1:])


def _timeout(timeout):
    # multiprocessing treats a negative timeout as zero (its SemLock does), and refuses what
    # is not a number with TypeError (SemLock's PyFloat_AsDouble, or `monotonic() + timeout`):
    # float() alone would parse a string
    if timeout is None:
        return -1.0
    if not (hasattr(type(timeout), "__float__") or hasattr(type(timeout), "__index__")):
        raise TypeError(f"timeout must be a real number, not {type(timeout).__name__}")
    return max(0.0, float(timeout))


# ------------------------------------------------------------------------------------------
# Rings: handles and attachment (one mapping per ring per process)

class _RingRef:
    __slots__ = ("ring", "__weakref__")

    def __init__(self, ring):
        self.ring = ring


_rings = weakref.WeakValueDictionary()   # inode -> _RingRef mapped in this process


def _new_ring():
    ref = _RingRef(_core.Ring())
    _rings[ref.ring.ino] = ref
    return ref


def _fd_handle(fd, dup=False):
    """How a child finds our `fd`: while multiprocessing is starting a child (spawn,
    forkserver), the fd travels with it (DupFd, as multiprocessing sends its Connections), so
    this process may close it right after start(); otherwise the receiver opens
    /proc/<pid>/fd/<fd>, and this process must hold the fd until then. With `dup` (a
    Connection's fds), it always travels as multiprocessing's DupFd: outside a child's start,
    multiprocessing's resource sharer holds a duplicate until the receiver takes it, so the
    sender may close its end at once (and a socket, which /proc cannot open, goes too)."""
    popen = _mpctx.get_spawning_popen()
    if popen is None and dup:
        return (_reduction.DupFd(fd),)
    if popen is not None:
        # One DupFd per fd per child (a ring can be in both ends of a Pipe sent together):
        # the child's fds_to_keep must not repeat an fd.
        dups = _spawn_dups.setdefault(popen, {})
        if fd not in dups:
            dups[fd] = _reduction.DupFd(fd)
        return (dups[fd],)
    return (os.getpid(), fd)


_spawn_dups = weakref.WeakKeyDictionary()   # spawning Popen -> {fd: DupFd}


def _detach_once(dup):
    """The fd a DupFd brought, or None when this process already took it (the same DupFd
    unpickles once per use but owns one fd)."""
    if getattr(dup, "_pp_taken", False):
        return None
    fd = dup.detach()
    dup._pp_taken = True
    return fd


def _ring_handle(ref, dup=False):
    return (_fd_handle(ref.ring.fd, dup), ref.ring.ino)


def _attach_ring(handle):
    fdh, ino = handle
    ref = _rings.get(ino)
    fd = _detach_once(fdh[0]) if len(fdh) == 1 else None
    if ref is not None:
        if fd is not None:
            os.close(fd)
        return ref
    if len(fdh) == 1:
        try:
            ring = _core.Ring.attach(os.getpid(), fd, ino)
        finally:
            os.close(fd)
    else:
        ring = _core.Ring.attach(fdh[0], fdh[1], ino)
    ref = _RingRef(ring)
    _rings[ino] = ref
    return ref


# ------------------------------------------------------------------------------------------
# Queues

class Queue:
    """multiprocessing.Queue on a shared-memory ring (see the module docstring)."""

    def __init__(self, maxsize=0, *, ctx=None, maxbytes=None):
        if not isinstance(maxsize, int):
            raise TypeError("maxsize must be an integer, not %s" % type(maxsize).__name__)
        if maxbytes is not None and (not isinstance(maxbytes, int) or maxbytes <= 0):
            raise ValueError("maxbytes must be a positive integer or None")
        # As multiprocessing: maxsize <= 0 means unbounded.
        self._maxsize = maxsize if maxsize > 0 else _SEM_VALUE_MAX
        self._bound = maxsize if maxsize > 0 else 0
        # Unread bytes are bounded only when asked (pyparallel's own keyword): put() then
        # waits while the queue is not empty and would hold more than `maxbytes` unread
        # bytes. multiprocessing's put never waits on bytes (its feeder thread buffers them
        # in the producer), so a default bound could hang a program that works there.
        self._maxbytes = maxbytes or 0
        self._ref = _new_ring()
        self._ring = self._ref.ring
        self._closed = False
        self._joincancelled = False

    def __reduce__(self):
        return (_rebuild_queue, (type(self), _ring_handle(self._ref), self._maxsize, self._bound,
                                 self._maxbytes))

    def _check_closed(self):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def put(self, obj, block=True, timeout=None):
        if self._closed:
            self._check_closed()
        # Bytes go as they are (what pickling them and unpickling gives back); anything else
        # is pickled here, before the queue is touched.
        if type(obj) is bytes:
            ok = self._ring.put(_TAG_RAW, obj, block, -1.0 if timeout is None else
                                _timeout(timeout), self._bound, self._maxbytes)
        else:
            try:
                parts = _dumps(obj)
            except Exception as e:
                # As multiprocessing's feeder thread: the item is dropped (it takes no room
                # and no unfinished task), the hook is told, and put returns.
                if not block and self.full():
                    raise _queue.Full from None
                self._on_queue_feeder_error(e, obj)
                return
            ok = self._ring.put(_TAG_PICKLE, parts, block, -1.0 if timeout is None else
                                _timeout(timeout), self._bound, self._maxbytes)
        if not ok:
            raise _queue.Full

    @staticmethod
    def _on_queue_feeder_error(e, obj):
        """Called (inside the ``except`` block) when ``put`` could not pickle ``obj``;
        multiprocessing's hook of the same name, for overriding: prints the traceback."""
        import traceback
        traceback.print_exc()

    def get(self, block=True, timeout=None):
        if self._closed:
            self._check_closed()
        msg = self._ring.get(block, -1.0 if timeout is None else _timeout(timeout))
        if msg is None:
            raise _queue.Empty
        return _unpack(msg)

    def put_nowait(self, obj):
        return self.put(obj, False)

    def get_nowait(self):
        return self.get(False)

    def qsize(self):
        return self._ring.qsize()

    def empty(self):
        return self._ring.qsize() == 0

    def full(self):
        return self._bound > 0 and self._ring.qsize() >= self._bound

    def close(self):
        """No more puts or gets through this object (other processes are not affected)."""
        self._closed = True

    def join_thread(self):
        # There is no feeder thread to join: every put is already in shared memory.
        assert self._closed, "Queue {0!r} not closed".format(self)

    def cancel_join_thread(self):
        self._joincancelled = True


class JoinableQueue(Queue):
    """multiprocessing.JoinableQueue: Queue plus task_done() and join()."""

    def task_done(self):
        self._ring.task_done()   # ValueError: task_done() called too many times

    def join(self):
        while not self._ring.join(-1.0):
            pass


def _rebuild_queue(cls, handle, maxsize, bound, maxbytes=0):
    q = cls.__new__(cls)
    q._maxsize = maxsize
    q._bound = bound
    q._maxbytes = maxbytes
    q._ref = _attach_ring(handle)
    q._ring = q._ref.ring
    q._closed = False
    q._joincancelled = False
    return q


class SimpleQueue:
    """multiprocessing.SimpleQueue: put, get, empty, close."""

    def __init__(self, *, ctx=None):
        self._ref = _new_ring()
        self._ring = self._ref.ring
        self._closed = False

    def __reduce__(self):
        return (_rebuild_simple, (_ring_handle(self._ref),))

    def _check_closed(self):
        if self._closed:
            raise OSError("handle is closed")   # what multiprocessing's closed pipe says

    def empty(self):
        self._check_closed()
        return self._ring.qsize() == 0

    def put(self, obj):
        if self._closed:
            self._check_closed()
        if type(obj) is bytes:
            self._ring.put(_TAG_RAW, obj, True, -1.0, 0)
        else:
            self._ring.put(_TAG_PICKLE, _dumps(obj), True, -1.0, 0)

    def get(self):
        if self._closed:
            self._check_closed()
        return _unpack(self._ring.get(True, -1.0))

    def close(self):
        self._closed = True


def _rebuild_simple(handle):
    q = SimpleQueue.__new__(SimpleQueue)
    q._ref = _attach_ring(handle)
    q._ring = q._ref.ring
    q._closed = False
    return q


# ------------------------------------------------------------------------------------------
# Pipe and Connection

def _open_pipe_end(fdh):
    """Our own fd for a Connection's fd sent as _fd_handle(fd, dup=True)."""
    return fdh[0].detach()


class Connection:
    """multiprocessing.connection.Connection over a shared-memory ring (see Pipe)."""

    def __init__(self, inbound, rfd, outbound, wfd):
        self._in = inbound          # _RingRef or None
        self._out = outbound
        # The fd that carries one byte per message: duplex, both are this end's socket of a
        # socketpair (as under multiprocessing's duplex Pipe, so that fileno() passes fds
        # with multiprocessing.reduction.send_handle/recv_handle); otherwise an OS pipe's end.
        self._rfd = rfd             # where the inbound bytes arrive, or None
        self._wfd = wfd             # where the outbound bytes go, or None
        self._readable = rfd is not None
        self._writable = wfd is not None
        self._closed = False

    # -- state
    @property
    def closed(self):
        return self._closed

    @property
    def readable(self):
        return self._readable

    @property
    def writable(self):
        return self._writable

    def _check_closed(self):
        if self._closed:
            raise OSError("handle is closed")

    def _check_readable(self):
        if not self._readable:
            raise OSError("connection is write-only")

    def _check_writable(self):
        if not self._writable:
            raise OSError("connection is read-only")

    def fileno(self):
        """The fd that becomes readable when a message (or end-of-file) is waiting."""
        self._check_closed()
        return self._rfd if self._rfd is not None else self._wfd

    def close(self):
        if not self._closed:
            self._closed = True
            for fd in {self._rfd, self._wfd}:
                if fd is not None:
                    os.close(fd)
            self._rfd = self._wfd = None
            self._in = self._out = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.close()

    def __reduce__(self):
        self._check_closed()
        inb = None if self._rfd is None else (_ring_handle(self._in, True),
                                              _fd_handle(self._rfd, True))
        if self._wfd is None:
            outb = None
        elif self._wfd == self._rfd:   # duplex: one socket
            outb = (_ring_handle(self._out, True), None)
        else:
            outb = (_ring_handle(self._out, True), _fd_handle(self._wfd, True))
        return (_rebuild_connection, (inb, outb))

    # -- sending
    def _send(self, tag, parts):
        ring = self._out.ring
        try:
            if not ring.put(tag, parts, False, 0.0, 0, _PIPE_MAX_UNREAD):
                # The other end holds _PIPE_MAX_UNREAD unread bytes: wait for it to read, in
                # slices, so that an end closed (or a reader dead) meanwhile ends the wait.
                while True:
                    if self._peer_gone():
                        raise BrokenPipeError(errno.EPIPE, "Broken pipe")
                    if ring.put(tag, parts, True, _SEND_SLICE_S, 0, _PIPE_MAX_UNREAD):
                        break
            os.write(self._wfd, b"\0")   # BrokenPipeError once every reader is gone
        except BrokenPipeError:
            self._drop_unread()
            raise

    def _peer_gone(self):
        """Whether every holder of the other end closed it (or died): nothing will ever read
        what this end sends."""
        p = select.poll()
        p.register(self._wfd, select.POLLOUT)
        ev = p.poll(0)
        # an OS pipe's write end shows POLLERR, a duplex end's socket POLLHUP
        return bool(ev) and bool(ev[0][1] & (select.POLLERR | select.POLLHUP))

    def _drop_unread(self):
        """Gives back what this end sent and no one will read (the other end is closed
        everywhere): the shared memory of those messages returns to the system now."""
        ring = self._out.ring
        while ring.get(False, 0.0) is not None:
            pass

    def send(self, obj):
        """Send a (picklable) object."""
        self._check_closed()
        self._check_writable()
        self._send(_TAG_PICKLE, _dumps(obj))

    def send_bytes(self, buf, offset=0, size=None):
        """Send the bytes data from a bytes-like object."""
        self._check_closed()
        self._check_writable()
        m = memoryview(buf)
        if m.itemsize > 1:
            m = m.cast('B')
        n = m.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        self._send(_TAG_BYTES, [m[offset:offset + size]])

    # -- receiving
    def _wait(self, timeout):
        """True when a message or end-of-file is waiting (GIL released, Ctrl-C works)."""
        if self._in.ring.qsize() > 0:
            return True
        p = select.poll()
        p.register(self._rfd, select.POLLIN)
        return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))

    def _recv_msg(self):
        ring = self._in.ring
        # A reply often comes within microseconds: wait on the ring itself for a moment (it
        # polls, then yields) before sleeping in poll() on the fd, which costs a wake-up.
        msg = ring.get(False, 0.0) or ring.get(True, _RECV_SPIN_S)
        while True:
            if msg is None:
                msg = ring.get(False, 0.0)
            if msg is not None:
                # The byte that goes with it (written just after the commit; b"" if its
                # writer died in between).
                os.read(self._rfd, 1)
                return msg
            self._wait(None)
            if ring.qsize() == 0:
                p = select.poll()
                p.register(self._rfd, select.POLLIN)
                ev = p.poll(0)
                # every holder of the other end closed it (or died), and no byte is left
                if ev and ev[0][1] & (select.POLLHUP | select.POLLERR) and not _unread(self._rfd):
                    raise EOFError

    def recv(self):
        """Receive a (picklable) object."""
        self._check_closed()
        self._check_readable()
        tag, parts = self._recv_msg()
        if tag == _TAG_BYTES:
            return pickle.loads(parts[0])
        return _loads(parts)

    def _recv_data(self):
        tag, parts = self._recv_msg()
        if tag == _TAG_BYTES or len(parts) == 1:
            return parts[0]
        # An object sent with out-of-band buffers, asked for as bytes: one plain pickle.
        return ForkingPickler.dumps(_loads(parts))

    def recv_bytes(self, maxlength=None):
        """Receive bytes data as a bytes object."""
        self._check_closed()
        self._check_readable()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        data = self._recv_data()
        if maxlength is not None and len(data) > maxlength:
            self._bad_message_length()
        return bytes(data)

    def _bad_message_length(self):
        if self._writable:
            self._readable = False
        else:
            self.close()
        raise OSError("bad message length")

    def recv_bytes_into(self, buf, offset=0):
        """Receive bytes data into a writeable bytes-like object; returns the bytes read."""
        self._check_closed()
        self._check_readable()
        with memoryview(buf) as m:
            itemsize = m.itemsize
            bytesize = itemsize * len(m)
            if offset < 0:
                raise ValueError("negative offset")
            elif offset > bytesize:
                raise ValueError("offset too large")
            data = self._recv_data()
            size = len(data)
            if bytesize < offset + size:
                raise BufferTooShort(bytes(data))
            m.cast("B")[offset:offset + size] = data
            return size

    def poll(self, timeout=0.0):
        """Whether there is any input available to be read (or end-of-file)."""
        self._check_closed()
        self._check_readable()
        return self._wait(timeout)


def _rebuild_connection(inb, outb):
    rfd = wfd = None
    inbound = outbound = None
    try:
        if inb is not None:
            inbound = _attach_ring(inb[0])
            rfd = _open_pipe_end(inb[1])
        if outb is not None:
            outbound = _attach_ring(outb[0])
            wfd = rfd if outb[1] is None else _open_pipe_end(outb[1])
    except BaseException:
        if rfd is not None:
            os.close(rfd)
        raise
    return Connection(inbound, rfd, outbound, wfd)


def _unread(fd):
    """How many bytes wait to be read on a pipe or socket."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


def _socketpair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)   # close-on-exec
    try:
        for sock in (a, b):
            try:   # room for more unread messages (the system caps it: net.core.wmem_max)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            except OSError:
                pass
        return a.detach(), b.detach()
    finally:
        a.close()
        b.close()


def _os_pipe():
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, 1 << 20)   # room for a million unread messages
    except OSError:
        pass
    return r, w


def Pipe(duplex=True):
    """Returns a pair (conn1, conn2) of Connections, as multiprocessing.Pipe: duplex, the
    bytes that announce the messages go over a socketpair (multiprocessing's duplex Pipe is
    one), else over an OS pipe (as multiprocessing's one-way Pipe)."""
    if duplex:
        s1, s2 = _socketpair()
        a, b = _new_ring(), _new_ring()
        # conn1 reads what conn2 writes (ring a) and the other way round (ring b)
        return Connection(a, s1, b, s1), Connection(b, s2, a, s2)
    r, w = _os_pipe()
    ring = _new_ring()
    return Connection(ring, r, None, None), Connection(None, None, ring, w)
