"""pyparallel.Pool on a real Dask distributed cluster (the "dask" backend).

A module fixture starts ``dask scheduler`` and two ``dask worker --nthreads 1 --no-dashboard``
processes on 127.0.0.1, as a user would, and tears them down with nothing left. The Pool API
tests run on both backends (``local`` and ``dask``) with the same bodies; the rest is
Dask-only: lost workers, an unreachable scheduler, batching, big arguments sent once.

The scheduler runs with ``allowed-failures`` 0, so that a task on a worker that dies fails
with KilledWorker at once and the pool's own ``retries`` is the only retry layer (the default
cluster setting, 3, reschedules such tasks itself first)."""
import contextlib
import gc
import importlib.util
import itertools
import multiprocessing
import multiprocessing.pool
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

if importlib.util.find_spec("distributed") is None:
    pytest.skip("distributed is not installed", allow_module_level=True)


class _Lazy:
    """distributed, imported when a test first needs it (not at collection: see conftest)."""

    def __getattr__(self, name):
        if name.startswith("_"):  # pytest looks at every module attribute while collecting
            raise AttributeError(name)
        import distributed

        return getattr(distributed, name)


distributed = _Lazy()

import pyparallel  # noqa: E402
from pyparallel import Pool  # noqa: E402
from pyparallel.pool import (InitializerError, PoolTerminatedError,  # noqa: E402
                             WorkerLostError)

pytestmark = [pytest.mark.dask, pytest.mark.timeout(120)]

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- task functions (importable by the workers: tests/ is on their PYTHONPATH) ----


# the local pool's own task functions: the same bodies run on both backends
from test_pool import (add, boom, echo, getpid, init_fail, init_global, read_global,  # noqa: E402
                       sleepy, square, unpicklable_result)


def array_sum(a, k):
    return float(a[k])


def kill_self(x):
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def _main_function(source, name, **globs):
    """A function as a notebook or script defines it: module __main__, globals of its own."""
    ns = {"__name__": "__main__", **globs}
    exec(source, ns)
    f = ns[name]
    assert f.__module__ == "__main__"
    return f


# ---- the cluster ----


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask_command():
    exe = os.path.join(os.path.dirname(sys.executable), "dask")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "dask"]


def _group_members(pgids):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) in pgids:
                out.append(int(d))
    return out


class Cluster:
    def __init__(self, address, procs):
        self.address = address
        self.procs = procs
        self.client = None

    def scheduler_tasks(self, prefix="pyparallel"):
        """Keys (and sizes) of this prefix that the scheduler holds."""
        def tasks(dask_scheduler, prefix=prefix):
            return {str(k): ts.nbytes for k, ts in dask_scheduler.tasks.items()
                    if str(k).startswith(prefix)}
        return self.client.run_on_scheduler(tasks)

    def worker_pids(self):
        return self.client.run(os.getpid)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with _run_cluster(tmp_path_factory.mktemp("dask-logs")) as c:
        yield c


@contextlib.contextmanager
def _run_cluster(logs, workers=2):
    """A scheduler and ``workers`` workers on 127.0.0.1 (each in a process group of its own:
    ``procs[0]`` is the scheduler's), torn down with nothing left."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (HERE, os.environ.get("PYTHONPATH")) if p))
    env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "0"
    env.pop("PYTHONFAULTHANDLER", None)
    cmd = _dask_command()
    procs = []

    def start(args, name):
        log = open(logs / f"{name}.log", "wb")
        procs.append(subprocess.Popen(cmd + args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    c = Cluster(address, procs)
    try:
        start(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
              "scheduler")
        for i in range(workers):
            start(["worker", address, "--nthreads", "1", "--no-dashboard", "--host",
                   "127.0.0.1", "--name", f"w{i}"], f"worker{i}")
        c.client = distributed.Client(address, timeout=60, set_as_default=False)
        c.client.wait_for_workers(workers, timeout=90)
        yield c
    finally:
        if c.client is not None:
            c.client.close()
        pgids = [p.pid for p in procs]
        for p in procs[::-1]:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while _group_members(pgids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pg in pgids:
            try:
                os.killpg(pg, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(10)
        time.sleep(0.2)
        assert not _group_members(pgids), "dask processes left behind"


def _wait_workers(cluster, n=2, timeout=60):
    cluster.client.wait_for_workers(n, timeout=timeout)


@pytest.fixture(params=["local", "dask"])
def make_pool(request):
    """Pool(...) on each backend (the dask one on the module's cluster)."""
    if request.param == "local":
        yield Pool
        return
    cluster = request.getfixturevalue("cluster")
    _wait_workers(cluster)
    threads_before = {t for t in threading.enumerate()}

    def make(processes=None, *args, **kw):
        return Pool(processes, *args, backend="dask", address=cluster.address, **kw)

    yield make
    # nothing of the pools left: their collector threads ended, no task on the cluster
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        gc.collect()
        extra = [t for t in threading.enumerate() if t not in threads_before
                 and t.name.startswith("pyparallel")]
        left = cluster.scheduler_tasks()
        if not extra and not left:
            break
        time.sleep(0.1)
    assert not extra, f"threads left behind: {extra}"
    assert not left, f"tasks left on the cluster: {left}"


# ---- the Pool API, on both backends ----


def test_map_and_friends(make_pool):
    with make_pool(2) as p:
        assert p.map(square, range(100)) == [x * x for x in range(100)]
        assert p.map(square, []) == []
        assert p.map(square, [3, 4], chunksize=1) == [9, 16]
        assert p.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert p.apply(add, (1,), {"b": 5}) == 6
        assert list(p.imap(square, range(20))) == [x * x for x in range(20)]
        assert list(p.imap(square, range(20), chunksize=3)) == [x * x for x in range(20)]
        assert sorted(p.imap_unordered(square, range(20))) == [x * x for x in range(20)]
        assert p.apply_async(square, (7,)).get(timeout=30) == 49


def test_exception_type_and_remote_traceback(make_pool):
    with make_pool(2) as p:
        with pytest.raises(ZeroDivisionError, match="boom 3") as ei:
            p.map(boom, range(6))
        assert isinstance(ei.value.__cause__, multiprocessing.pool.RemoteTraceback)
        assert "boom" in str(ei.value.__cause__)
        r = p.apply_async(boom, (3,))
        r.wait(30)
        assert r.ready() and not r.successful()
        with pytest.raises(ZeroDivisionError):
            r.get()
        it = p.imap(boom, range(5))
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ZeroDivisionError):
            next(it)
        assert next(it) == 4


def test_async_result_behaviour(make_pool):
    with make_pool(2) as p:
        r = p.apply_async(sleepy, (2,))     # long enough to be seen running on a busy machine
        assert not r.ready()
        with pytest.raises(ValueError):
            r.successful()
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(timeout=0.01)
        assert r.get(timeout=60) == 2
        assert r.ready() and r.successful()
        assert isinstance(r, multiprocessing.pool.AsyncResult)


def test_imap_next_timeout(make_pool):
    with make_pool(2) as p:
        it = p.imap(sleepy, [2, 0])         # long enough to be seen running on a busy machine
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.01)
        assert it.next(timeout=60) == 2
        assert it.next(timeout=30) == 0
        with pytest.raises(StopIteration):
            it.next(timeout=30)


def test_callbacks_and_error_callbacks(make_pool, capfd):
    got, errs = [], []

    def bad_callback(_):
        raise RuntimeError("callback failed")

    with make_pool(2) as p:
        p.map_async(square, range(5), callback=got.append).wait(30)
        p.apply_async(boom, (3,), error_callback=errs.append).wait(30)
        p.starmap_async(add, [(1, 1)], callback=got.append).wait(30)
        p.map_async(boom, range(5), error_callback=errs.append).wait(30)
        assert p.apply_async(square, (3,), callback=bad_callback).get(30) == 9
        assert p.map(square, range(4)) == [0, 1, 4, 9]
    assert got == [[0, 1, 4, 9, 16], [2]]
    assert [type(e) for e in errs] == [ZeroDivisionError, ZeroDivisionError]
    assert "callback failed" in capfd.readouterr().err


def test_state_rules(make_pool):
    p = make_pool(2)
    with pytest.raises(ValueError, match="still running"):
        p.join()
    p.close()
    for call in (lambda: p.map(square, [1]), lambda: p.apply(square, (1,)),
                 lambda: p.imap(square, [1]), lambda: p.apply_async(square, (1,)),
                 lambda: p.starmap(add, [(1, 2)]), lambda: p.imap_unordered(square, [1])):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    p.join()
    with pytest.raises(ValueError):
        with p:
            pass
    with pytest.raises(ValueError, match="Chunksize"):
        with make_pool(1) as q:
            q.imap(square, [1], chunksize=0)


def test_close_join_completes_pending_work(make_pool):
    p = make_pool(2)
    r = p.map_async(sleepy, [0.1] * 4, chunksize=1)
    it = p.imap(square, range(50))
    p.close()
    p.join()
    assert r.get(0) == [0.1] * 4
    assert list(it) == [x * x for x in range(50)]
    assert p._state == "CLOSE"


def test_context_manager_terminates(make_pool):
    with make_pool(2) as p:
        assert p.map(square, [1, 2]) == [1, 4]
    assert p._state == "TERMINATE"


def test_initializer(make_pool):
    with make_pool(2, initializer=init_global, initargs=(42,)) as p:
        assert p.map(read_global, range(4), chunksize=1) == [42] * 4


def test_initializer_exception_fails_tasks_does_not_hang(make_pool):
    with make_pool(2, initializer=init_fail) as p:
        with pytest.raises(InitializerError) as ei:
            p.map(square, range(4))
        assert "initializer failed on purpose" in str(ei.value)


def test_unpicklable_arguments_raise_in_caller(make_pool):
    with make_pool(2) as p:
        lock = threading.Lock()
        with pytest.raises(TypeError):
            p.map(echo, [1, lock])
        with pytest.raises(TypeError):
            p.apply_async(echo, (lock,))
        with pytest.raises(TypeError):
            list(p.imap(echo, [lock]))
        assert p.map(square, [2]) == [4]
        assert not p._cache


def test_unpicklable_result_is_maybe_encoding_error_for_that_task_only(make_pool):
    with make_pool(2) as p:
        rs = [p.apply_async(unpicklable_result, (i,)) for i in range(4)]
        assert rs[0].get(30) == 0
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            rs[2].get(30)
        assert rs[3].get(30) == 3
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            p.map(unpicklable_result, range(4))


def test_terminate_during_map_fails_pending_no_hang(make_pool):
    p = make_pool(2)
    r = p.map_async(sleepy, [0.2] * 20, chunksize=1)
    time.sleep(0.3)
    p.terminate()
    with pytest.raises(PoolTerminatedError):
        r.get(30)
    p.join()


def test_imap_iterable_that_raises(make_pool):
    def gen():
        yield 1
        yield 2
        raise ValueError("input failed")

    with make_pool(2) as p:
        it = p.imap(square, gen())
        assert next(it) == 1
        assert next(it) == 4
        with pytest.raises(ValueError, match="input failed"):
            next(it)


def test_lambdas_closures_and_main_functions(make_pool):
    k = 3
    scale = _main_function("def scale(x):\n    return x * K + helper(x)\n"
                           "def helper(x):\n    return 1\n", "scale", K=10)
    with make_pool(2) as p:
        assert p.map(lambda x: x + k, range(5)) == [3, 4, 5, 6, 7]
        assert p.map(scale, range(4)) == [1, 11, 21, 31]
        assert sorted(p.imap_unordered(lambda x: -x, range(4))) == [-3, -2, -1, 0]


def test_initializer_global_seen_by_main_functions(make_pool):
    ns = {"__name__": "__main__"}
    exec("def init(v):\n    global TOKEN\n    TOKEN = v\n"
         "def read(_):\n    return TOKEN\n", ns)
    with make_pool(2, initializer=ns["init"], initargs=("tok",)) as p:
        assert p.map(ns["read"], range(6), chunksize=1) == ["tok"] * 6


def test_endless_generator_through_imap_unordered(make_pool):
    read = itertools.count()

    def endless():
        for i in read:
            yield i

    with make_pool(2) as p:
        it = p.imap_unordered(square, endless())
        got = list(itertools.islice(it, 200))
        time.sleep(0.5)  # the caller stops taking: the pool stops reading
        taken = next(read)
        more = list(itertools.islice(it, 1000))
    assert len(got) == 200 and len(more) == 1000
    assert set(got + more) <= {i * i for i in range(taken + 10000)}
    assert len(set(got + more)) == 1200
    # both backends read a bounded window ahead (dask: up to 8192 items, for its batches)
    assert taken < 200 + 10000, f"read {taken} items for 200 results: not lazy"


def test_big_numpy_argument_used_by_many_tasks(make_pool):
    np = pytest.importorskip("numpy")
    a = np.arange(2 << 20, dtype=np.float64)  # 16 MB
    with make_pool(2) as p:
        assert p.starmap(array_sum, [(a, k) for k in range(0, 40, 2)], chunksize=1) == \
            [float(k) for k in range(0, 40, 2)]
        assert p.apply(array_sum, (a, 7)) == 7.0


# ---- Dask only ----


@pytest.fixture
def dask_pool(cluster):
    _wait_workers(cluster)
    pools = []

    def make(processes=None, **kw):
        p = Pool(processes, backend="dask", address=cluster.address, **kw)
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.terminate()
        p.join()
    deadline = time.monotonic() + 10
    while cluster.scheduler_tasks() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not cluster.scheduler_tasks()


def test_processes_default_is_the_clusters_threads(dask_pool, cluster):
    p = dask_pool()
    assert p._processes == 2
    assert p.start_method is None
    workers = p._pool
    assert sorted(w.pid for w in workers) == sorted(cluster.worker_pids().values())
    assert all(w.is_alive() and w.exitcode is None for w in workers)


def test_client_given_is_left_open(cluster):
    _wait_workers(cluster)
    c = distributed.Client(cluster.address, timeout=30, set_as_default=False)
    try:
        with Pool(backend="dask", client=c) as p:
            assert p.map(square, range(10)) == [x * x for x in range(10)]
        assert c.status == "running"
        assert c.submit(square, 5).result(30) == 25
    finally:
        c.close()


def test_client_alone_selects_the_dask_backend(cluster):
    with Pool(client=cluster.client) as p:
        assert p.map(square, [3]) == [9]


def test_options_are_checked_before_connecting(cluster):
    with pytest.raises(ValueError, match="maxtasksperchild"):
        Pool(2, maxtasksperchild=3, backend="dask", address=cluster.address)
    with pytest.raises(TypeError):
        Pool(backend="dask", address=cluster.address, no_such_option=1)
    with pytest.raises(TypeError, match="not both"):
        Pool(backend="dask", address=cluster.address, client=cluster.client)
    with pytest.raises(ValueError, match="retries"):
        Pool(backend="dask", address=cluster.address, retries=-1)
    with pytest.raises(ValueError, match="address="):
        Pool(backend="dask")


def test_unreachable_scheduler_clear_error_within_timeout():
    port = _free_port()
    before = set(threading.enumerate())
    # the error names the timeout it honoured (the default is 10 s); no speed is measured
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port} within 1 s"):
        Pool(backend="dask", address=f"tcp://127.0.0.1:{port}", connect_timeout=1)
    deadline = time.monotonic() + 60      # hang guard: the connect thread ends
    while [t for t in set(threading.enumerate()) - before if t.is_alive()]:
        assert time.monotonic() < deadline, "a thread of the failed connect stayed"
        time.sleep(0.05)


def test_batching_few_dask_tasks_for_many_tiny_items(dask_pool):
    p = dask_pool(2)
    n = 20000
    assert p.map(square, range(n), chunksize=1) == [x * x for x in range(n)]
    assert p._backend.submitted < 200, p._backend.submitted
    before = p._backend.submitted
    assert list(p.imap(square, range(n))) == [x * x for x in range(n)]
    assert p._backend.submitted - before < 200


def test_worker_killed_mid_map_is_retried(dask_pool, cluster):
    p = dask_pool(2)
    r = p.map_async(sleepy, [0.4] * 10, chunksize=1)
    time.sleep(0.8)
    victim = sorted(cluster.worker_pids().values())[0]
    os.kill(victim, signal.SIGKILL)
    assert r.get(90) == [0.4] * 10
    _wait_workers(cluster)


def test_task_that_kills_its_worker_fails_clearly(dask_pool, cluster):
    p = dask_pool(2, retries=0)
    r = p.apply_async(kill_self, (1,))
    ok = p.apply_async(square, (4,))
    with pytest.raises(WorkerLostError, match="pyparallel-") as ei:
        r.get(90)
    assert isinstance(ei.value.__cause__, distributed.KilledWorker)
    assert ok.get(60) == 16
    assert p.map(square, range(6)) == [x * x for x in range(6)]
    _wait_workers(cluster)


def test_terminate_cancels_futures_on_the_cluster(dask_pool, cluster):
    p = dask_pool(2)
    # the tasks would take 20 minutes: only their cancellation clears the scheduler within
    # the hang guards
    r = p.map_async(sleepy, [600] * 4, chunksize=1)
    deadline = time.monotonic() + 120
    while not cluster.scheduler_tasks() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.scheduler_tasks()
    busy = cluster.worker_pids()
    p.terminate()
    with pytest.raises(PoolTerminatedError):
        r.get(120)
    deadline = time.monotonic() + 120
    while cluster.scheduler_tasks() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cluster.scheduler_tasks()
    # a running task's thread cannot be stopped: restart the workers sleeping in it
    for pid in busy.values():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        try:
            pids = cluster.worker_pids()
        except Exception:  # noqa: BLE001 - a worker going away while asked
            pids = {}
        if len(pids) == 2 and not set(pids.values()) & set(busy.values()):
            break
        assert time.monotonic() < deadline, "the workers did not come back"
        time.sleep(0.2)


def test_big_numpy_argument_is_sent_once(dask_pool, cluster):
    np = pytest.importorskip("numpy")
    a = np.ones(100 << 17, dtype=np.float64)  # 100 MB
    a[::1000] = 2.0
    p = dask_pool(2)
    r = p.starmap_async(array_sum, [(a, k) for k in range(50)], chunksize=1)
    # while it runs, the cluster holds one copy of the array's key (plus tiny task keys)
    sizes = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not r.ready():
        sizes.update(cluster.scheduler_tasks(prefix=""))
        time.sleep(0.05)
    assert r.get(60) == [2.0 if k % 1000 == 0 else 1.0 for k in range(50)]
    big = {k: v for k, v in sizes.items() if v >= 50 << 20}
    assert len(big) == 1, big
    assert p._backend.scattered == 1
    assert p._backend.sent_bytes < 10 << 20  # the 50 tasks' own payloads are small


def array_at(a, k):
    return float(a[k])


def test_numpy_argument_changed_in_place_is_sent_again(dask_pool):
    np = pytest.importorskip("numpy")
    a = np.zeros(1 << 18)  # 2 MB: scattered
    p = dask_pool(2)
    assert p.apply(array_at, (a, 5)) == 0.0
    assert p.apply(array_at, (a, 6)) == 0.0  # the same data: not sent again
    assert p._backend.scattered == 1
    a[5] = 7.0  # in place: the same object, other data
    assert p.apply(array_at, (a, 5)) == 7.0
    assert p._backend.scattered == 2
    assert p.starmap(array_at, [(a, 5), (a, 0)]) == [7.0, 0.0]  # the new data, already there
    assert p._backend.scattered == 2


def slow_item(x):
    time.sleep(0.05)
    return x


def test_scheduler_killed_mid_map_fails_the_pools_calls_at_once(tmp_path):
    with _run_cluster(tmp_path, workers=2) as c:
        p = Pool(2, backend="dask", address=c.address)
        try:
            assert p.map(slow_item, range(4)) == [0, 1, 2, 3]
            killer = threading.Timer(2.0, os.killpg, (c.procs[0].pid, signal.SIGKILL))
            killer.start()
            result = p.map_async(slow_item, range(400), chunksize=1)  # 10 s of work
            with pytest.raises(ConnectionError, match="lost the connection to the scheduler"):
                result.get(90)  # a hang guard: it fails as soon as the client notices
            killer.join()
            with pytest.raises(ConnectionError):
                p.map(slow_item, range(4))  # and the later calls, at once
        finally:
            p.terminate()
            p.join()


def test_missing_distributed_names_the_extra_and_local_pool_never_imports_it():
    code = (
        "import sys\n"
        "import pyparallel as pp\n"
        "with pp.Pool(1) as p:\n"
        "    assert p.map(abs, [-1]) == [1]\n"
        "assert 'distributed' not in sys.modules, 'local pool imported distributed'\n"
        "sys.modules['distributed'] = None\n"
        "try:\n"
        "    pp.Pool(backend='dask', address='tcp://127.0.0.1:1')\n"
        "except ImportError as e:\n"
        "    assert 'pyparallel[dask]' in str(e), e\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_kernels_run_on_the_workers_bulk_path(dask_pool):
    fib = pyparallel.kernels.fib
    p = dask_pool(2)
    xs = list(range(10, 30))
    assert p.map(fib, xs) == [fib(x) for x in xs]
    assert p._backend.submitted >= 1  # sent to the cluster, not run here
    assert sorted(p.imap_unordered(fib, xs)) == sorted(fib(x) for x in xs)
    assert p.starmap(fib, [(x,) for x in xs]) == [fib(x) for x in xs]
    assert p.apply(fib, (20,)) == 6765


def test_dask_worker_identity_not_callers(dask_pool, cluster):
    p = dask_pool(2)
    pids = set(p.map(getpid, range(8), chunksize=1))
    assert os.getpid() not in pids
    assert pids <= set(cluster.worker_pids().values())

