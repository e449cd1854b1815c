"""IPC benchmark: pyparallel's Queue, SimpleQueue and Pipe against multiprocessing's Queue,
SimpleQueue and Pipe, and faster-fifo (when installed: the `bench` extra), in the same run.

Cases
  throughput  P producers / C consumers (1/1 and 4/4), 64-byte and 1 MiB bytes messages, and
              (1/1) a small object that must be pickled: (int, float, 40-char str), 64 bytes
              pickled. Each producer waits at a start line, then puts its share; each consumer
              gets its share. Time = last consumer's end - first producer's start, taken inside
              the processes with perf_counter (CLOCK_MONOTONIC, common to all processes).
              Reported as messages per second.
  latency     ping-pong between two processes over two queues (or one duplex pipe), 64-byte
              messages; reported as microseconds per round trip.
Method: fork start method; each case runs --repeats times (after one warm-up); the table shows
the median and the spread (min-max) and the ratio to multiprocessing.Queue in the same run.
A run whose processes fail or take longer than RUN_LIMIT_S (faster-fifo has been seen to hang
at 1 MiB) marks that implementation "failed" for the case instead of stopping the benchmark.
Caveats: a small shared machine gives noisy numbers, and 4/4 on 2 CPUs measures contention
more than parallelism. Usage: python benchmarks/bench_ipc.py [--quick] [--repeats N] [--json P]
"""
import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import pyparallel as pp

CTX = mp.get_context("fork")
RUN_LIMIT_S = 120.0
SMALL_OBJ = (12345, 2.5, "x" * 40)   # pickles to 64 bytes


class RunFailed(Exception):
    pass

try:
    import faster_fifo
except ImportError:   # the bench extra is not installed
    faster_fifo = None


def _queues(size):
    qs = {
        "pyparallel.Queue": lambda: pp.Queue(),
        "pyparallel.SimpleQueue": lambda: pp.SimpleQueue(),
        "multiprocessing.Queue": lambda: CTX.Queue(),
        "multiprocessing.SimpleQueue": lambda: CTX.SimpleQueue(),
    }
    if faster_fifo is not None:
        qs["faster_fifo.Queue"] = lambda: _FF(max(1 << 22, 8 * size))
    return qs


class _FF:
    """faster_fifo.Queue with long timeouts (its default of 10 s raises Full/Empty when a busy
    machine stalls a peer)."""

    def __init__(self, nbytes):
        self.q = faster_fifo.Queue(max_size_bytes=nbytes)

    def put(self, m):
        self.q.put(m, True, RUN_LIMIT_S)

    def get(self):
        return self.q.get(True, RUN_LIMIT_S)


def _producer(q, n, msg, times, slot, ready, nprocs):
    ready.add(1)
    while ready.load() < nprocs:
        pass
    times[slot] = time.perf_counter()
    put = q.put
    for _ in range(n):
        put(msg)


def _consumer(q, n, times, slot, ready, nprocs):
    ready.add(1)
    while ready.load() < nprocs:
        pass
    get = q.get
    for _ in range(n):
        get()
    times[slot] = time.perf_counter()


def _join_all(procs):
    deadline = time.monotonic() + RUN_LIMIT_S
    failed = False
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode != 0:
            failed = True
    if failed:
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
        raise RunFailed("a benchmark process failed or hung")


def throughput(make, nprod, ncons, size, total):
    q = make()
    msg = SMALL_OBJ if size == "obj" else os.urandom(size)
    times = pp.RawArray("d", nprod + ncons)
    ready = pp.RawValue("q", 0)
    nprocs = nprod + ncons
    procs = [CTX.Process(target=_producer, args=(q, total // nprod, msg, times, k, ready, nprocs))
             for k in range(nprod)]
    procs += [CTX.Process(target=_consumer, args=(q, total // ncons, times, nprod + k, ready,
                                                  nprocs)) for k in range(ncons)]
    for p in procs:
        p.start()
    _join_all(procs)
    return total / (max(times[nprod:]) - min(times[:nprod]))


def _ponger(a, b, n):
    for _ in range(n):
        b.put(a.get())


def _pipe_ponger(conn, n):
    for _ in range(n):
        conn.send_bytes(conn.recv_bytes())


def latency(make, n):
    msg = os.urandom(64)
    if make in ("pyparallel.Pipe", "multiprocessing.Pipe"):
        a, b = (pp.Pipe if make == "pyparallel.Pipe" else CTX.Pipe)()
        p = CTX.Process(target=_pipe_ponger, args=(b, n))
        p.start()
        a.send_bytes(msg)
        a.recv_bytes()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            a.send_bytes(msg)
            a.recv_bytes()
        dt = time.perf_counter() - t0
    else:
        qa, qb = make(), make()
        p = CTX.Process(target=_ponger, args=(qa, qb, n))
        p.start()
        qa.put(msg)
        qb.get()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            qa.put(msg)
            qb.get()
        dt = time.perf_counter() - t0
    _join_all([p])
    return dt / (n - 1) * 1e6


def _run(fn, repeats, label):
    print("  %s ..." % label, end="", file=sys.stderr, flush=True)
    try:
        fn()   # warm-up
        xs = [fn() for _ in range(repeats)]
    except RunFailed as e:
        print(" FAILED (%s)" % e, file=sys.stderr, flush=True)
        return None
    print(" done", file=sys.stderr, flush=True)
    return statistics.median(xs), min(xs), max(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    scale = 0.1 if args.quick else 1.0
    print("pyparallel bench_ipc: Python %s, %s, %d CPUs, faster-fifo %s" % (
        platform.python_version(), platform.machine(), os.cpu_count(),
        getattr(faster_fifo, "__version__", "installed") if faster_fifo else "NOT installed"))
    rows = []

    def add(case, name, unit, res):
        if res is None:
            rows.append(dict(case=case, impl=name, unit=unit, failed=True))
        else:
            rows.append(dict(case=case, impl=name, unit=unit, median=res[0], min=res[1],
                             max=res[2]))

    cases = [(1, 1, 64, 40_000), (1, 1, "obj", 40_000), (1, 1, 1 << 20, 400),
             (4, 4, 64, 40_000), (4, 4, 1 << 20, 400)]
    for nprod, ncons, size, total in cases:
        total = max(int(total * scale) // 4 * 4, 8)
        case = "throughput %d/%d %s" % (nprod, ncons, {64: "64 B", "obj": "small obj",
                                                       1 << 20: "1 MiB"}[size])
        for name, make in _queues(64 if size == "obj" else size).items():
            add(case, name, "msg/s",
                _run(lambda: throughput(make, nprod, ncons, size, total), args.repeats,
                     "%s %s" % (case, name)))
    n = max(int(4000 * scale), 200)
    lat = dict(_queues(64))
    lat["pyparallel.Pipe"] = "pyparallel.Pipe"
    lat["multiprocessing.Pipe"] = "multiprocessing.Pipe"
    case = "latency ping-pong 64 B"
    for name, make in lat.items():
        add(case, name, "us/round trip", _run(lambda: latency(make, n), args.repeats,
                                              "%s %s" % (case, name)))
    for r in rows:
        base = [b for b in rows if b["case"] == r["case"] and b["impl"] == "multiprocessing.Queue"]
        if r.get("failed") or not base or base[0].get("failed"):
            r["vs_mp_queue"] = None
        elif r["unit"] == "msg/s":
            r["vs_mp_queue"] = r["median"] / base[0]["median"]
        else:
            r["vs_mp_queue"] = base[0]["median"] / r["median"]   # > 1: faster than mp.Queue
    print("\n%-26s %-28s %14s %25s %9s" % ("case", "implementation", "median", "spread",
                                           "vs mp.Q"))
    for r in rows:
        if r.get("failed"):
            print("%-26s %-28s %14s %25s %9s" % (r["case"], r["impl"], "FAILED", "", "-"))
            continue
        ratio = "-" if r["vs_mp_queue"] is None else "%.1fx" % r["vs_mp_queue"]
        print("%-26s %-28s %14s %25s %9s" % (
            r["case"], r["impl"], _fmt(r["median"], r["unit"]),
            "%s-%s" % (_fmt(r["min"], r["unit"]), _fmt(r["max"], r["unit"])), ratio))
    print("\n(vs mp.Q: throughput ratio, or latency of multiprocessing.Queue / this one)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(python=platform.python_version(), cpus=os.cpu_count(), rows=rows), f,
                      indent=1)
    return 0


def _fmt(v, unit):
    if unit == "msg/s":
        return "%.0f/s" % v if v < 1e4 else "%.0fk/s" % (v / 1e3)
    return "%.1f us" % v


if __name__ == "__main__":
    sys.exit(main())
