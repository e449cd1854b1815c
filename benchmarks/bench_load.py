"""pyparallel on a busy machine: the pools and queues against multiprocessing (and
concurrent.futures where it has the same call) with N busy processes beside them.

Workloads (2 workers by default, or --workers N), each at every load level (--loads, default
0,1,2,4 processes running ``while True: pass`` beside the benchmark):
  W8 latency     1,000 sequential apply_async(noop).get() (executor: submit().result())  us each
  W1 tiny tasks  map(square, range(200_000)) on a warm pool                           us per task
  W9 burst       20,000 apply_async(f, (i,)) then get() on each (executor: submit, result)  ms
  Q  ping-pong   a pair of queues to a child process, 2,000 round trips of 64 bytes    us each
and, on the quiet machine only (each start is a whole process start, busy or not):
  W10 recycling  maxtasksperchild=10, 4,000 no-op tasks (--quick: 400), chunksize 1, under
                 fork, forkserver and spawn (not the executor: see run())            ms

Method: at each load level the busy processes start first and run through all of that level's
turns; the libraries take turns within each repeat, the order turning by one each repeat;
each turn runs on a fresh pool made and warmed outside the timed region (W10 times the whole
map, recycling included, on a pool started outside it). 5 repeats (--quick: 3); the median
is reported with the spread; "vs mp" is the median over multiprocessing's median from the
same level of the same run (lower is better). Timings drift with the machine: compare ratios
from one run, not times across runs.

Usage: python benchmarks/bench_load.py [--quick] [--repeats N] [--workers N] [--loads 0,1,2,4]
                                       [--only W8,W1,W9,Q,W10] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import bench_ipc  # this folder: the queue ping-pong is bench_ipc's latency
import pyparallel

WORKLOADS = ("W8", "W1", "W9", "Q", "W10")


def square(x):
    return x * x


def noop(*_):
    return None


class Busy:
    """n processes spinning beside the benchmark while the block runs."""

    def __init__(self, n):
        self.n = n
        self.procs = []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(self.n)]
        time.sleep(0.2 if self.n else 0)  # let them reach their loop
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


# ---- one timed turn of each workload, per library: (setup -> pool, timed(pool), teardown) ----


def _pool_lib(name, workers, method="fork", **kw):
    if name == "pyparallel":
        return pyparallel.Pool(workers, context=method, **kw)
    if name == "multiprocessing":
        return multiprocessing.get_context(method).Pool(workers, **kw)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), **kw)


def _close(pool):
    if isinstance(pool, ProcessPoolExecutor):
        pool.shutdown()
    else:
        pool.close()
        pool.join()


def w8(pool, n=1000):
    if isinstance(pool, ProcessPoolExecutor):
        t0 = time.perf_counter()
        for _ in range(n):
            pool.submit(noop).result()
    else:
        t0 = time.perf_counter()
        for _ in range(n):
            pool.apply_async(noop).get()
    return (time.perf_counter() - t0) / n * 1e6


def w1(pool, n=200_000):
    t0 = time.perf_counter()
    if isinstance(pool, ProcessPoolExecutor):
        workers = pool._max_workers
        list(pool.map(square, range(n), chunksize=max(1, n // (workers * 4))))
    else:
        pool.map(square, range(n))
    return (time.perf_counter() - t0) / n * 1e6


def w9(pool, n=20_000):
    t0 = time.perf_counter()
    if isinstance(pool, ProcessPoolExecutor):
        fs = [pool.submit(square, i) for i in range(n)]
        out = [f.result() for f in fs]
    else:
        rs = [pool.apply_async(square, (i,)) for i in range(n)]
        out = [r.get() for r in rs]
    dt = time.perf_counter() - t0
    assert out[-1] == (n - 1) ** 2
    return dt * 1e3


def ping_pong(lib, n=2000):
    """bench_ipc's queue latency: 64-byte round trips through a pair of queues to a child."""
    return bench_ipc.latency(pyparallel.Queue if lib == "pyparallel" else bench_ipc.CTX.Queue, n)


def w10(lib, workers, method, n):
    pool = _pool_lib(lib, workers, method, maxtasksperchild=10)
    try:
        t0 = time.perf_counter()
        pool.map(noop, range(n), chunksize=1)
        return (time.perf_counter() - t0) * 1e3
    finally:
        _close(pool)


def _pooled(fn, lib, workers, warm):
    pool = _pool_lib(lib, workers)
    try:
        warm(pool)
        return fn(pool)
    finally:
        _close(pool)


def _turns(cases, repeats):
    """{label: [times]}: the cases (label, fn) take turns, the order turning each repeat."""
    times = {label: [] for label, _ in cases}
    for r in range(repeats):
        k = r % len(cases)
        for label, fn in cases[k:] + cases[:k]:
            times[label].append(fn())
    return times


def run(workers, quick, loads, only, repeats=None):
    repeats = repeats or (3 if quick else 5)
    rows = []
    libs = ("pyparallel", "multiprocessing", "concurrent.futures")

    def add(workload, unit, load, times):
        mp_med = statistics.median(times["multiprocessing"])
        for lib, xs in times.items():
            med = statistics.median(xs)
            rows.append({"workload": workload, "unit": unit, "busy": load, "library": lib,
                         "median": med, "min": min(xs), "max": max(xs),
                         "vs_mp": med / mp_med if mp_med else None})
            print(f"  {workload:<14} busy={load} {lib:<19} {med:10.2f} {unit:<8} "
                  f"({min(xs):.2f}-{max(xs):.2f})  {med / mp_med:5.2f}x mp", flush=True)

    def warm8(pool):
        w8(pool, 100)

    def warm1(pool):
        w1(pool, 20_000)

    for load in loads:
        with Busy(load):
            if "W8" in only:
                add("W8 latency", "us", load, _turns(
                    [(lib, lambda lib=lib: _pooled(w8, lib, workers, warm8)) for lib in libs],
                    repeats))
            if "W1" in only:
                add("W1 tiny tasks", "us/task", load, _turns(
                    [(lib, lambda lib=lib: _pooled(w1, lib, workers, warm1)) for lib in libs],
                    repeats))
            if "W9" in only:
                n = 5000 if quick else 20_000
                add("W9 burst", "ms", load, _turns(
                    [(lib, lambda lib=lib: _pooled(lambda p: w9(p, n), lib, workers, warm8))
                     for lib in libs], repeats))
            if "Q" in only:
                add("Q ping-pong", "us", load, _turns(
                    [(lib, lambda lib=lib: ping_pong(lib)) for lib in libs[:2]], repeats))
    if "W10" in only:
        n = 400 if quick else 4000
        for method in ("fork", "forkserver", "spawn"):
            reps = repeats if method == "fork" else max(1, repeats - 2)
            # not the executor: it refuses max_tasks_per_child under fork, and on 3.11 its
            # map hangs with it under forkserver (a CPython bug, seen here)
            add(f"W10 recycle {method}", "ms", 0, _turns(
                [(lib, lambda lib=lib: w10(lib, workers, method, n)) for lib in libs[:2]],
                reps))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loads", default="0,1,2,4")
    ap.add_argument("--only", default=",".join(WORKLOADS))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    loads = [int(x) for x in args.loads.split(",")]
    only = set(args.only.split(","))
    print(f"bench_load: {os.cpu_count()} CPUs, {args.workers} workers, Python "
          f"{platform.python_version()}, busy processes {loads}", flush=True)
    rows = run(args.workers, args.quick, loads, only, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "workers": args.workers,
                       "python": platform.python_version(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
