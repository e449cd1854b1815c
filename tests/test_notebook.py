"""pyparallel in a real Jupyter kernel (issue 12): a notebook driven cell by cell.

The notebook is built here with nbformat and run by nbclient in an IPython kernel (ipykernel)
of this very interpreter; its kernel spec is installed for the test into a temporary prefix
(``python -m ipykernel install --prefix TMP``) and found through ``JUPYTER_PATH``, and the
Jupyter/IPython config, data and runtime directories point into the same temporary directory,
so nothing global is read or written and a clean clone needs nothing but the test extra.

The cells do what a notebook user does: a function defined in one cell and used by
``pp.Pool().map`` in another, a lambda, an initializer setting a global read by the tasks, a
``pp.Array`` viewed with numpy and filled by the tasks, progress, a task that raises (the cell's error
shows the worker's traceback), and two interrupts, as the notebook's stop button sends them
(``km.interrupt_kernel()``: SIGINT to the kernel's process group, workers included): one of a
long ``pool.map`` and one of a long ``pp.kernels.fib`` call. After each interrupt the kernel is
alive, the pool made in an earlier cell still works in the next cell, the interrupted call's
result failed with TaskCancelledError, and the processes under the kernel are exactly the
pool's workers (besides multiprocessing's own forkserver and resource tracker, which the
standard library keeps for the kernel's lifetime): none left over, none a zombie. After the
kernel's shutdown none of the processes ever seen under it is left.

A cell shows a progress bar (``progress=True``, tqdm.auto) and a progress callable.
"""
import asyncio
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import nbformat
from nbclient import NotebookClient

pytestmark = pytest.mark.timeout(300)

KERNEL = "pyparallel-test"
CELL_TIMEOUT = 120         # seconds a cell may run before nbclient fails it (a hang, not a pass)
INTERRUPT_AFTER = 2.0      # seconds into a long cell when the interrupt is sent
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# name -> source; run in this order. Names are for the assertions below.
CELLS = [
    ("imports", """
        import os, time
        import numpy as np
        import pyparallel as pp
        from pyparallel.pool import TaskCancelledError
    """),
    ("define", """
        def square(x):
            return x * x
    """),
    ("pool_map", """
        with pp.Pool() as p:
            print("default pool:", p.map(square, range(10)))
        pool = pp.Pool(2)
        print("pool:", pool.map(square, range(10)))
    """),
    ("lambda", """
        print("lambda:", pool.map(lambda x: x + 0.5, range(4)))
    """),
    ("progress", """
        seen = []
        out = pool.map(square, range(50), progress=True)
        pool.map(square, range(20), chunksize=5, progress=lambda done, total: seen.append((done, total)))
        print("progress:", out[-1], seen)
    """),
    ("initializer", """
        OFFSET = 0

        def set_offset(value):
            global OFFSET
            OFFSET = value

        def add_offset(x):
            return x + OFFSET

        with pp.Pool(2, initializer=set_offset, initargs=(100,)) as p:
            print("initializer:", p.map(add_offset, range(4)), "here:", OFFSET)
    """),
    ("array", """
        arr = pp.Array("d", 16)
        view = np.asarray(arr)            # zero-copy: sees what the workers write

        def fill(job):
            shared, lo, hi = job
            np.asarray(shared)[lo:hi] = np.arange(lo, hi) * 1.5
            return os.getpid()

        pids = pool.map(fill, [(arr, lo, lo + 4) for lo in range(0, 16, 4)], chunksize=1)
        print("array:", view.tolist(), "in parent:", os.getpid() in pids)
    """),
    ("raises", """
        def boom(x):
            raise ValueError(f"bad input {x}")

        pool.map(boom, [7])
    """),
    ("pids_before", """
        print("workers:", sorted(w.pid for w in pool._pool))
    """),
    ("long_map", """
        result = pool.map_async(time.sleep, [600] * 4)
        result.get()
    """),
    ("after_map", """
        try:
            result.get(timeout=60)
        except TaskCancelledError as e:
            print("cancelled:", type(e).__name__)
        print("after:", pool.map(square, range(5)), pool.apply(square, (9,)))
        print("workers:", sorted(w.pid for w in pool._pool))
    """),
    ("long_fib", """
        pp.kernels.fib(80)
    """),
    ("after_fib", """
        print("fib:", pp.kernels.fib(20), pool.map(square, [3]))
        print("workers:", sorted(w.pid for w in pool._pool))
    """),
    ("close", """
        pool.terminate()
        pool.join()
        print("closed")
    """),
]
INDEX = {name: i for i, (name, _) in enumerate(CELLS)}


def _dedent(src):
    import textwrap

    return textwrap.dedent(src).strip("\n")


@pytest.fixture(scope="module")
def jupyter_env(tmp_path_factory):
    """A kernel spec for this interpreter in a temporary prefix, and Jupyter/IPython
    directories there too; the environment is restored afterwards."""
    root = tmp_path_factory.mktemp("jupyter")
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(root),
                    "--name", KERNEL, "--display-name", "pyparallel test"],
                   check=True, capture_output=True, timeout=60)
    env = {
        "JUPYTER_PATH": str(root / "share" / "jupyter"),
        "JUPYTER_CONFIG_DIR": str(root / "config"),
        "JUPYTER_DATA_DIR": str(root / "data"),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        "IPYTHONDIR": str(root / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield root
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _procs():
    """{pid: (parent pid, state letter, start time)} of every process now."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d)] = (int(fields[1]), fields[0], fields[19])
    return out


def _descendants(pid):
    """{pid: (parent pid, state letter, start time)} of the processes under pid (its
    children, theirs, ...), zombies included."""
    procs = _procs()
    out, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for p, info in procs.items():
            if info[0] == parent and p not in out:
                out[p] = info
                todo.append(p)
    return out


_MP_HELPERS = (b"multiprocessing.forkserver", b"multiprocessing.resource_tracker")


def _is_mp_helper(pid):
    """multiprocessing's forkserver or resource tracker (they live as long as the kernel), for
    a child of the kernel (the forkserver's own children, the workers, show its command line
    too)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return any(h in cmdline for h in _MP_HELPERS)


def _still_there(seen):
    """The processes of `seen` (as :func:`_descendants`) that still exist (the same ones: same
    start time)."""
    procs = _procs()
    return {p: procs[p][1] for p, (_, _, start) in seen.items()
            if p in procs and procs[p][2] == start}


def _stdout(cell):
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def _line(cell, tag):
    """The value printed after `tag` in the cell's stdout."""
    for line in _stdout(cell).splitlines():
        if line.startswith(tag):
            return line[len(tag):].strip()
    raise AssertionError(f"no {tag!r} line in the cell's output: {cell.outputs!r}")


def _error(cell):
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert len(errors) == 1, f"expected one error output, got {cell.outputs!r}"
    return errors[0], _ANSI.sub("", "\n".join(errors[0].traceback))


class _Run:
    """Runs the notebook's cells one at a time in a kernel that the test controls."""

    def __init__(self, client):
        self.client = client
        self.cells = client.nb.cells

    @property
    def kernel_pid(self):
        return self.client.km.provisioner.process.pid

    def run(self, name, interrupt_after=None):
        i = INDEX[name]
        timer = None
        if interrupt_after is not None:
            km = self.client.km
            # the stop button: the manager's interrupt, from a thread while the cell runs
            timer = threading.Timer(interrupt_after, lambda: asyncio.run(km.interrupt_kernel()))
            timer.start()
        start = time.monotonic()
        try:
            cell = self.client.execute_cell(self.cells[i], i)
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()
        return cell, time.monotonic() - start

    def settled_children(self, expected, seen, limit=60.0):
        """{pid: state} of the processes under the kernel but multiprocessing's helpers, once
        they are `expected` (killed workers take a moment to be reaped), or as they are after
        `limit` seconds. Every process found under the kernel is added to `seen`."""
        end = time.monotonic() + limit
        while True:
            kernel = self.kernel_pid
            tree = _descendants(kernel)
            seen.update(tree)
            kids = {p: state for p, (ppid, state, _) in tree.items()
                    if not (ppid == kernel and _is_mp_helper(p))}
            if set(kids) == set(expected) or time.monotonic() > end:
                return kids
            time.sleep(0.05)


@pytest.fixture(scope="module")
def notebook(jupyter_env):
    """The whole notebook, run once cell by cell: {cell name: (cell, seconds, the kernel's
    children once settled after it ran)}; the tests below look at one part each."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(_dedent(src)) for _, src in CELLS]
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "pyparallel test",
                                 "language": "python"}
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, allow_errors=True,
                            startup_timeout=120, resources={"metadata": {"path": str(jupyter_env)}})
    done = {}
    seen = {}  # every process found under the kernel (as _descendants)
    with client.setup_kernel():
        run = _Run(client)
        assert client.km.kernel_spec.argv[0] == sys.executable
        for name, _ in CELLS:
            cell, took = run.run(name, INTERRUPT_AFTER if name.startswith("long_") else None)
            if "workers:" in _stdout(cell):  # the pool's workers as the cell saw them
                kids = run.settled_children(_pids(_line(cell, "workers:")), seen)
            elif name == "close":
                kids = run.settled_children(set(), seen)
            else:
                kids = None
            done[name] = (cell, took, kids)
        pid = run.kernel_pid
    # setup_kernel shut the kernel down: it and every process seen under it are gone
    assert seen
    deadline = time.monotonic() + 60
    while (_still_there(seen) or os.path.exists(f"/proc/{pid}")) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    done["shutdown"] = (None, 0.0, _still_there(seen))
    done["kernel_gone"] = not os.path.exists(f"/proc/{pid}")
    return done


def _pids(text):
    return set(int(p) for p in re.findall(r"\d+", text))


def _no_error(cell):
    assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs


def test_function_from_another_cell(notebook):
    cell = notebook["pool_map"][0]
    _no_error(cell)
    squares = str([x * x for x in range(10)])
    assert _line(cell, "default pool:") == squares
    assert _line(cell, "pool:") == squares


def test_lambda(notebook):
    cell = notebook["lambda"][0]
    assert _line(cell, "lambda:") == "[0.5, 1.5, 2.5, 3.5]"


def test_progress_bar(notebook):
    cell = notebook["progress"][0]
    _no_error(cell)
    # progress=True: tqdm.auto's widget (ipywidgets comes with the progress and test extras),
    # not a text bar with "TqdmWarning: IProgress not found"; a callable gets (done, total) as
    # chunks finish
    assert _line(cell, "progress:") == "2401 [(5, 20), (10, 20), (15, 20), (20, 20)]"
    stderr = "".join(o.get("text", "") for o in cell.outputs
                     if o.output_type == "stream" and o.name == "stderr")
    widgets = [o for o in cell.outputs if o.output_type == "display_data"
               and "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) == 1, cell.outputs
    assert "Warning" not in stderr and "50/50" not in stderr, cell.outputs


def test_initializer_sets_a_global(notebook):
    cell = notebook["initializer"][0]
    # the tasks saw the worker's global set by the initializer; the kernel's own is untouched
    assert _line(cell, "initializer:") == "[100, 101, 102, 103] here: 0"


def test_shared_array_with_numpy(notebook):
    cell = notebook["array"][0]
    expected = [i * 1.5 for i in range(16)]
    assert _line(cell, "array:") == f"{expected} in parent: False"


def _remote_part(text):
    """The worker's traceback inside the cell's error output (the RemoteTraceback cause)."""
    m = re.search(r'RemoteTraceback: \n"""\n(.*?)\n"""\n', text, re.S)
    assert m, f"no remote traceback in the error output:\n{text}"
    assert "The above exception was the direct cause" in text[m.end():]
    return m.group(1)


def test_worker_exception_shows_remote_traceback(notebook):
    err, text = _error(notebook["raises"][0])
    assert err.ename == "ValueError"
    assert err.evalue == "bad input 7"
    # the worker's traceback is the cause: it ends in boom, run in the worker
    remote = _remote_part(text)
    assert re.search(r'line 2, in boom\n', remote), remote
    assert remote.endswith("ValueError: bad input 7")


def test_remote_traceback_shows_the_cell_line(notebook):
    remote = _remote_part(_error(notebook["raises"][0])[1])
    assert 'raise ValueError(f"bad input {x}")' in remote, remote


def test_interrupt_long_map(notebook):
    cell, _, kids = notebook["pids_before"]
    before = _pids(_line(cell, "workers:"))
    assert len(before) == 2 and set(kids) == before

    cell, took, _ = notebook["long_map"]
    err, _ = _error(cell)
    assert err.ename == "KeyboardInterrupt"
    assert took < CELL_TIMEOUT  # hang guard: it stopped on the interrupt (the sleeps take 20 min)

    # the kernel is alive, the pool of an earlier cell still works, the call was cancelled
    cell, _, kids = notebook["after_map"]
    _no_error(cell)
    assert _line(cell, "cancelled:") == "TaskCancelledError"
    assert _line(cell, "after:") == "[0, 1, 4, 9, 16] 81"
    after = _pids(_line(cell, "workers:"))
    assert len(after) == 2
    # the kernel's children are exactly the pool's workers: the killed ones were reaped
    assert set(kids) == after, f"processes under the kernel {kids}, pool workers {after}"
    assert "Z" not in kids.values()


def test_interrupt_long_kernel_call(notebook):
    before = _pids(_line(notebook["after_map"][0], "workers:"))

    cell, took, _ = notebook["long_fib"]
    err, _ = _error(cell)
    assert err.ename == "KeyboardInterrupt"
    assert took < CELL_TIMEOUT  # hang guard: fib(80) runs for hours

    cell, _, kids = notebook["after_fib"]
    _no_error(cell)
    assert _line(cell, "fib:") == "6765 [9]"
    # the workers got the SIGINT too (it goes to the kernel's process group) and ignored it
    assert _pids(_line(cell, "workers:")) == before
    assert set(kids) == before, f"processes under the kernel {kids}, pool workers {before}"


def test_terminate_and_shutdown_leave_no_process(notebook):
    cell, _, kids = notebook["close"]
    assert _line(cell, "closed") == ""
    assert kids == {}, f"processes left after terminate: {kids}"
    assert notebook["shutdown"][2] == {}, "processes left after the kernel's shutdown"
    assert notebook["kernel_gone"], "the kernel process is still there after shutdown"
