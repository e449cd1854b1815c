"""Fixtures shared by the test files."""
import gc
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import threading
import time

import pytest

# A suite started in the background of a non-interactive shell (`(make test &)`, a CI
# runner's job) inherits SIGINT ignored, as every asynchronous command there does, and
# Python then leaves it ignored in this process and in every child it starts: the Ctrl-C
# tests would send a signal nobody sees. Take it back, as an interactive run has it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=["fork", "forkserver", "spawn"])
def pool_context(request):
    """A multiprocessing start method name, for the tests that run under each."""
    if request.param not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {request.param} not available")
    return request.param


# ---- leak gate: use with pytestmark = pytest.mark.usefixtures("no_leaks") ----


def _children(pid=None):
    me = str(os.getpid() if pid is None else pid)
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] != "Z":
                kids.append(int(d))
    return kids


@pytest.fixture
def no_leaks():
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    before = set(_children()) | set(_forkserver_children())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        gc.collect()
        # (under forkserver the workers are the forkserver's children)
        extra = (set(_children()) | set(_forkserver_children())) - before
        if not extra:
            break
        time.sleep(0.05)
    # the forkserver process is shared by all forkserver pools and stays, as in multiprocessing
    # (and so does the resource tracker it starts)
    extra.discard(multiprocessing.forkserver._forkserver._forkserver_pid)
    extra.discard(multiprocessing.resource_tracker._resource_tracker._pid)
    assert not extra, f"leaked child processes: {extra}"
    # The channel is a memfd: nothing may appear in /dev/shm (other programs on this machine
    # may create files there, so only look for ours), and no channel may stay mapped or open.
    if os.path.isdir("/dev/shm"):
        assert not [n for n in set(os.listdir("/dev/shm")) - shm_before if "pyparallel" in n]
    if not any(t.name == "pyparallel-collector" and t.is_alive() for t in threading.enumerate()):
        assert _open_channels() == 0, "a channel memfd is still open"


def _forkserver_children():
    """The children of this process's forkserver (none while it has none)."""
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    return _children(pid) if pid is not None else []


def _open_channels():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "pyparallel-channel" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n



def pytest_collection_modifyitems(config, items):
    """The Dask tests run last: importing distributed installs tblib's pickling of exceptions
    for the whole process (SystemExit then loses its ``code`` in any pickle round trip,
    multiprocessing's included), which would change what later tests in this process see."""
    items.sort(key=lambda item: item.get_closest_marker("dask") is not None)
