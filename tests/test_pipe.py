"""pyparallel.Pipe: multiprocessing.connection.Connection's API and errors (CPython's
_TestConnection cases, restated), end-of-file when the other end closes or dies, wait(),
children under every start method, big messages, no leaked fds."""
import gc
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing.connection import wait

import numpy as np
import pytest

import pyparallel as pp

METHODS = [m for m in ("fork", "forkserver", "spawn") if m in mp.get_all_start_methods()]


@pytest.fixture(params=METHODS)
def ctx(request):
    return mp.get_context(request.param)


def _echo(conn, other):
    other.close()   # under fork the child holds both ends; EOF needs the parent's end alone
    while True:
        try:
            msg = conn.recv_bytes()
        except EOFError:
            break
        conn.send_bytes(msg)
    conn.close()


def _double(conn):
    conn.send(conn.recv() * 2)
    conn.close()


def _sleep_forever(conn):
    conn.send("ready")
    time.sleep(600)


@pytest.fixture(params=["pp", "mp"])
def pipe(request):
    return pp.Pipe if request.param == "pp" else mp.Pipe


def test_send_recv_objects_and_bytes(pipe):
    a, b = pipe()
    for obj in [1, "x", None, [1, (2, 3)], {"k": b"v"}, 2 ** 80]:
        a.send(obj)
        assert b.recv() == obj
    a.send_bytes(b"abcdef")
    assert b.recv_bytes() == b"abcdef"
    a.send_bytes(b"abcdef", 2)
    assert b.recv_bytes() == b"cdef"
    a.send_bytes(b"abcdef", 1, 3)
    assert b.recv_bytes() == b"bcd"
    a.send_bytes(np.arange(4, dtype=np.int32))      # itemsize > 1: sent as its bytes
    assert b.recv_bytes() == np.arange(4, dtype=np.int32).tobytes()
    a.send(["mixed"])
    assert pickle_loads(b.recv_bytes()) == ["mixed"]   # send() then recv_bytes(): a pickle
    a.close()
    b.close()


def pickle_loads(data):
    import pickle
    return pickle.loads(data)


def test_send_bytes_bad_ranges(pipe):
    a, b = pipe()
    for args, msg in [((-1,), "offset is negative"), ((10,), "buffer length < offset"),
                      ((0, -1), "size is negative"), ((4, 4), "buffer length < offset + size")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            a.send_bytes(b"abcdef", *args)
    assert not b.poll()


def test_recv_bytes_into(pipe):
    a, b = pipe()
    a.send_bytes(b"hello")
    buf = bytearray(10)
    assert b.recv_bytes_into(buf) == 5 and buf[:5] == b"hello"
    a.send_bytes(b"hi")
    assert b.recv_bytes_into(buf, 7) == 2 and buf[7:9] == b"hi"
    arr = np.zeros(2, dtype=np.int64)
    a.send_bytes(b"12345678")
    assert b.recv_bytes_into(arr) == 8 and arr.tobytes()[:8] == b"12345678"
    a.send_bytes(b"too long for it")
    with pytest.raises(mp.BufferTooShort) as e:
        b.recv_bytes_into(bytearray(3))
    assert e.value.args[0] == b"too long for it"
    with pytest.raises(ValueError, match="negative offset"):
        b.recv_bytes_into(buf, -1)
    with pytest.raises(ValueError, match="offset too large"):
        b.recv_bytes_into(buf, 11)


def test_recv_bytes_maxlength(pipe):
    a, b = pipe()
    with pytest.raises(ValueError, match="negative maxlength"):
        b.recv_bytes(-1)
    a.send_bytes(b"x" * 100)
    with pytest.raises(OSError, match="bad message length"):
        b.recv_bytes(10)
    with pytest.raises(OSError):   # the end is no longer readable, as multiprocessing
        b.recv_bytes()


def test_poll_and_eof(pipe):
    a, b = pipe()
    assert b.poll() is False
    assert b.poll(0.05) is False
    a.send(1)
    assert b.poll() is True and b.poll(None) is True
    assert b.recv() == 1
    a.send(2)
    a.close()
    assert b.recv() == 2          # drained first, then EOF
    assert b.poll(1) is True      # end-of-file counts as readable
    with pytest.raises(EOFError):
        b.recv()
    with pytest.raises(EOFError):
        b.recv_bytes()


def test_closed_and_one_way_errors(pipe):
    r, w = pipe(duplex=False)
    assert r.readable and not r.writable and w.writable and not w.readable
    with pytest.raises(OSError, match="read-only"):
        r.send(1)
    with pytest.raises(OSError, match="write-only"):
        w.recv()
    w.close()
    assert w.closed
    with pytest.raises(OSError, match="handle is closed"):
        w.send(1)
    with pytest.raises(OSError, match="handle is closed"):
        w.fileno()
    w.close()   # twice is fine
    with r:
        pass
    assert r.closed


def test_send_to_closed_reader_is_broken_pipe(pipe):
    a, b = pipe()
    b.close()
    with pytest.raises(BrokenPipeError):
        for _ in range(100):
            a.send_bytes(b"x" * 100)


def test_wait_on_connections():
    a, b = pp.Pipe()
    c, d = pp.Pipe()
    assert wait([b, d], timeout=0.05) == []
    c.send("hi")
    assert wait([b, d], timeout=10) == [d]
    assert d.recv() == "hi"
    a.close()
    assert wait([b], timeout=10) == [b]   # EOF wakes wait() too


def test_child_under_each_start_method(ctx):
    a, b = pp.Pipe()
    p = ctx.Process(target=_double, args=(b,))
    p.start()
    b.close()            # allowed right after start(), as with multiprocessing.Pipe
    a.send(21)
    assert a.recv() == 42
    p.join(30)
    with pytest.raises(EOFError):
        a.recv()


def test_echo_big_messages(ctx):
    a, b = pp.Pipe()
    p = ctx.Process(target=_echo, args=(b, a))
    p.start()
    b.close()
    for size in (0, 1, 1000, 70_000, 3 << 20):
        data = os.urandom(size)
        a.send_bytes(data)
        assert a.recv_bytes() == data
    arr = np.random.default_rng(0).random(1 << 17)
    a.send(arr)
    got = a.recv()
    assert np.array_equal(got, arr)
    a.close()
    p.join(30)
    assert p.exitcode == 0


def test_eof_when_peer_is_killed():
    a, b = pp.Pipe()
    p = mp.get_context("fork").Process(target=_sleep_forever, args=(b,))
    p.start()
    b.close()
    assert a.recv() == "ready"
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    with pytest.raises(EOFError):
        a.recv()


def test_no_leaked_fds():
    gc.collect()
    fds0 = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        a, b = pp.Pipe()
        a.send(b"x" * 100_000)
        b.recv()
        a.close()
        b.close()
        r, w = pp.Pipe(False)
        del r, w
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds0


# ---- shared memory of failed sends, bounded unread bytes (issue 26) ----

def _ring_kib(conn):
    return os.fstat(conn._out.ring.fd).st_blocks // 2


def _close_unread(conn, ready):
    ready.send("closing")    # what was sent to `conn` is never read
    conn.close()


def test_failed_send_gives_its_memory_back(ctx):
    # Sent to an end that is closed everywhere: BrokenPipeError, and what no one will read
    # goes back at once (before: 20 MiB more for each failed send, until this end closed).
    a, b = pp.Pipe()
    a.send_bytes(b"u" * (20 << 20))               # unread when the other end goes
    p = ctx.Process(target=_close_unread, args=(b, b))
    p.start()
    b.close()
    assert a.recv() == "closing"
    p.join(60)
    assert _ring_kib(a) >= 20 << 10
    for _ in range(3):
        with pytest.raises(BrokenPipeError):
            a.send_bytes(b"x" * (20 << 20))
    assert a._out.ring.qsize() == 0
    assert _ring_kib(a) < 1024
    a.close()


def _read_after(conn, go, n, out):
    go.recv()
    out.send([len(conn.recv_bytes()) for _ in range(n)])
    conn.close()


def test_send_blocks_while_too_much_is_unread(ctx, monkeypatch):
    # As multiprocessing's Pipe (a socket): a sender that is ahead of its reader by more
    # than the bound waits for it; a message bigger than the bound goes once the earlier ones
    # were read (before: every send returned at once, all of it held in shared memory).
    monkeypatch.setattr(pp.queues, "_PIPE_MAX_UNREAD", 1 << 20)
    r, w = pp.Pipe(duplex=False)
    go_r, go_w = pp.Pipe(duplex=False)
    res_r, res_w = pp.Pipe(duplex=False)
    sizes = [600 << 10] * 4 + [3 << 20]
    p = ctx.Process(target=_read_after, args=(r, go_r, len(sizes), res_w))
    p.start()
    r.close()
    res_w.close()
    sent = []

    def send_all():
        for n in sizes:
            w.send_bytes(b"s" * n)
            sent.append(n)

    t = threading.Thread(target=send_all)
    t.start()
    deadline = time.monotonic() + 60
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    t.join(0.5)
    assert t.is_alive() and len(sent) == 1        # the second would leave 1.2 MiB unread
    st = w._out.ring.stats()
    assert st["pending"] == 600 << 10 and w._out.ring.qsize() == 1
    go_w.send("go")
    t.join(120)
    assert not t.is_alive() and sent == sizes
    assert res_r.recv() == sizes
    p.join(60)
    assert p.exitcode == 0


def test_blocked_send_fails_when_reader_dies(ctx, monkeypatch):
    monkeypatch.setattr(pp.queues, "_PIPE_MAX_UNREAD", 1 << 20)
    a, b = pp.Pipe()
    p = ctx.Process(target=_sleep_forever, args=(b,))
    p.start()
    b.close()
    assert a.recv() == "ready"
    a.send_bytes(b"z" * (800 << 10))
    threading.Timer(0.5, os.kill, (p.pid, signal.SIGKILL)).start()
    with pytest.raises(BrokenPipeError):
        a.send_bytes(b"z" * (800 << 10))          # waits for a reader, then sees it gone
    p.join(60)
    assert a._out.ring.qsize() == 0 and _ring_kib(a) < 1024


def test_ctrl_c_interrupts_blocked_send():
    code = textwrap.dedent("""
        import os, signal, threading
        import pyparallel as pp
        pp.queues._PIPE_MAX_UNREAD = 1 << 20
        a, b = pp.Pipe()
        a.send_bytes(b"x" * (800 << 10))
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            a.send_bytes(b"y" * (800 << 10))
        except KeyboardInterrupt:
            print("interrupted", len(b.recv_bytes()), b.poll(0))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "interrupted 819200 False"


# ---- passing fds and Connections (CPython's test_fd_transfer, test_access) ----


@pytest.fixture
def resource_sharer():
    """A Connection sent outside a child's start travels through multiprocessing's resource
    sharer, a thread of this process: stopped afterwards (as CPython's tests do), so that later
    tests do not fork a multi-threaded process."""
    from multiprocessing import resource_sharer

    yield
    resource_sharer.stop(timeout=60)


def _write_to_passed_fd(conn, data):
    from multiprocessing import reduction

    fd = reduction.recv_handle(conn)
    with open(fd, "wb", closefd=True) as f:
        f.write(data)
    conn.send("written")
    conn.send(conn.recv() * 2)   # messages and fds interleave on the one end


def test_send_handle_over_a_duplex_pipe(ctx, tmp_path):
    # multiprocessing's duplex Pipe is a socketpair: reduction.send_handle/recv_handle pass
    # file descriptors over conn.fileno() (OSError: Socket operation on non-socket before)
    from multiprocessing import reduction

    a, b = pp.Pipe()
    p = ctx.Process(target=_write_to_passed_fd, args=(b, b"passed"))
    p.start()
    b.close()
    path = tmp_path / "out"
    with open(path, "wb") as f:
        reduction.send_handle(a, f.fileno(), p.pid)
    assert a.recv() == "written"
    a.send(21)
    assert a.recv() == 42
    p.join(60)
    assert p.exitcode == 0
    assert path.read_bytes() == b"passed"
    with pytest.raises(EOFError):
        a.recv()


def test_recv_handle_without_an_fd_raises_runtimeerror():
    from multiprocessing import reduction

    a, b = pp.Pipe()
    os.write(b.fileno(), b"\0")   # a byte with no fd attached
    with pytest.raises(RuntimeError):
        reduction.recv_handle(a)


def _use_passed_ends(conn):
    w = conn.recv()
    w.send("all is well")
    w.close()
    r = conn.recv()
    conn.send(r.recv() * 2)
    conn.close()


def test_a_sent_connection_may_be_closed_at_once(ctx, resource_sharer):
    # the sender closes its end right after sending it, as multiprocessing allows (the
    # receiver got EOFError, or FileNotFoundError opening /proc/<pid>/fd/N, before)
    conn, child = pp.Pipe()
    p = ctx.Process(target=_use_passed_ends, args=(child,))
    p.start()
    child.close()
    r, w = pp.Pipe(duplex=False)
    conn.send(w)
    w.close()
    assert r.recv() == "all is well"
    r.close()
    r, w = pp.Pipe(duplex=False)
    conn.send(r)
    r.close()
    w.send("foobar")
    w.close()
    assert conn.recv() == "foobar" * 2
    p.join(60)
    assert p.exitcode == 0
