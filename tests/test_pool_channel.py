"""The C channel under the pool: framing, streaming of messages larger than a ring, errors."""
import os
import threading
import time

import pytest

from pyparallel import _core


def _pair(task=256, result=256, nslots=2):
    ch = _core.Channel(nslots, task, result)
    return ch, _core.Channel.attach(os.getpid(), *ch.fds)


def test_messages_larger_than_the_ring_stream_both_ways():
    ch, w = _pair()
    msg = bytes(range(256)) * 97  # ~24 KiB through a 256-byte ring
    got = []
    t = threading.Thread(target=lambda: got.append(w.recv(1)))
    t.start()
    pos, size = 0, 8 + len(msg)
    while pos < size:
        pos = ch.put(1, (msg[:100], msg[100:]), pos)
        ch.wait([], 0.05)
    t.join(10)
    assert bytes(got[0]) == msg
    t = threading.Thread(target=w.send, args=(0, (b"head", msg)))
    t.start()
    out = None
    while out is None:
        ch.wait([], 0.05)
        out = ch.get(0)
    t.join(10)
    assert bytes(out) == b"head" + msg
    assert ch.get(0) is None
    ch.close()
    w.close()


def test_empty_message_and_many_small_ones():
    ch, w = _pair(task=1024)
    assert ch.put(0, ()) == 8
    assert w.recv(0) == bytearray()
    for i in range(200):  # wraps the ring many times
        data = str(i).encode() * (i % 7 + 1)
        assert ch.put(0, (data,)) == 8 + len(data)
        assert bytes(w.recv(0)) == data


def test_errors():
    with pytest.raises(ValueError):
        _core.Channel(0, 1024, 1024)
    ch, w = _pair()
    with pytest.raises(IndexError):
        ch.put(2, (b"x",))
    with pytest.raises(TypeError):
        ch.put(0, [b"x"])
    with pytest.raises(ValueError):
        ch.put(0, (b"x",), 100)
    with pytest.raises(ValueError):
        w.get(0)  # get/wait belong to the owner
    with pytest.raises(OSError):
        _core.Channel.attach(os.getpid(), 987654, 987653)
    ch.close()
    with pytest.raises(ValueError):
        ch.put(0, (b"x",))
    ch.close()  # idempotent


def test_full_ring_reports_partial_progress():
    ch, w = _pair(task=64)
    pos = ch.put(0, (b"a" * 1000,))
    assert 0 < pos < 1008  # what fitted; the rest is the caller's to send later
    assert ch.wait([], 0) is False  # no room yet: nothing to do


def _spin_cpu(ch, usec):
    """(found, CPU seconds this thread spent in ch.spin(usec)): CPU time, not wall time, so
    that a busy machine changes nothing."""
    t0 = time.thread_time()
    found = ch.spin(usec)
    return found, time.thread_time() - t0


def test_spin_stops_when_it_does_not_pay_and_resumes_when_a_probe_does():
    ch, w = _pair()
    found, cpu = _spin_cpu(ch, 500_000.0)  # half a second of polling, for nothing
    assert found is False and cpu >= 0.01
    found, cpu = _spin_cpu(ch, 500_000.0)  # spinning did not pay: this wait does not poll
    assert found is False and cpu < 0.005
    w.send(0, (b"r",))
    found, cpu = _spin_cpu(ch, 500_000.0)  # the probe: polls, finds the result at once
    assert found is True
    assert bytes(ch.get(0)) == b"r"
    found, cpu = _spin_cpu(ch, 500_000.0)  # the probe paid: polling again
    assert found is False and cpu >= 0.01
    ch.close()
    w.close()
