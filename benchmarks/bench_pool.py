"""pyparallel.Pool against multiprocessing.Pool, concurrent.futures.ProcessPoolExecutor,
joblib (loky) and mpire (when installed), serial as the reference, in one run.

Workloads (2 workers by default, or --workers N):
  W1 tiny tasks     map(square, range(200_000)) on a warm pool          us per task
  W2 coarse CPU     naive Python fib over [30,29,28,27,26,25]*2, chunksize 1   speedup vs serial
  W7 startup        create a pool, map a no-op over 2 items, close, join (fork, spawn)
  W8 latency        1,000 sequential apply_async(noop).get() on a warm pool  us per round trip
  W5 big arguments  32 numpy arrays of 4 MiB, the task returns the sum (chunksize 1)  GB/s

Method: each measurement is repeated (5 times, --quick: 3, W2 and W7-spawn fewer) and the
median is reported with the spread (min-max); "vs mp" is the median divided by
multiprocessing.Pool's median from the same run (lower is better). Pools are created outside
the timed region except in W7. Caveat: on a machine shared with other work, timings are noisy;
compare ratios from one run, not absolute times across runs.

Usage: python benchmarks/bench_pool.py [--quick] [--workers N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import pyparallel

try:
    import numpy as np
except ImportError:  # pragma: no cover
    np = None
try:
    import joblib
    from joblib.externals.loky import get_reusable_executor
except ImportError:  # pragma: no cover
    joblib = None
try:
    import mpire
except ImportError:  # pragma: no cover
    mpire = None


def square(x):
    return x * x


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def noop(*_):
    return None


def array_sum(a):
    return float(a.sum())


FIB_INPUTS = [30, 29, 28, 27, 26, 25] * 2


def _stdlib_chunksize(n, workers):
    c, extra = divmod(n, workers * 4)
    return c + bool(extra)


# ---- adapters: (make(method), map(pool, f, xs, chunksize), rt(pool), close(pool)) ----


class Lib:
    def __init__(self, name, make, map_, rt, close, methods=("fork", "spawn")):
        self.name, self.make, self.map, self.rt, self.close = name, make, map_, rt, close
        self.methods = methods


def _libs(workers):
    libs = [
        Lib("pyparallel", lambda m: pyparallel.Pool(workers, context=m),
            lambda p, f, xs, c: p.map(f, xs, c), lambda p: p.apply_async(noop).get(),
            lambda p: (p.close(), p.join())),
        Lib("multiprocessing", lambda m: multiprocessing.get_context(m).Pool(workers),
            lambda p, f, xs, c: p.map(f, xs, c), lambda p: p.apply_async(noop).get(),
            lambda p: (p.close(), p.join())),
        Lib("concurrent.futures",
            lambda m: ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(m)),
            lambda p, f, xs, c: list(p.map(f, xs, chunksize=c or _stdlib_chunksize(len(xs), workers))),
            lambda p: p.submit(noop).result(), lambda p: p.shutdown(wait=True)),
    ]
    if joblib is not None:
        def jl_make(m):
            ex = get_reusable_executor(max_workers=workers, reuse=False)
            return ex

        libs.append(Lib("joblib (loky)", jl_make,
                        lambda p, f, xs, c: list(p.map(f, xs, chunksize=c or _stdlib_chunksize(len(xs), workers))),
                        lambda p: p.submit(noop).result(), lambda p: p.shutdown(wait=True),
                        methods=("loky",)))
    if mpire is not None:
        libs.append(Lib("mpire", lambda m: mpire.WorkerPool(workers, start_method=m),
                        lambda p, f, xs, c: p.map(f, xs, chunk_size=c),
                        lambda p: p.apply_async(noop).get(),
                        lambda p: p.terminate()))
    return libs


def _time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def _warm(lib, method="fork"):
    p = lib.make(method if method in lib.methods else lib.methods[0])
    lib.map(p, square, [1, 2], 1)
    return p


def run(workers, quick):
    reps = 3 if quick else 5
    rows = []
    libs = _libs(workers)

    def record(workload, lib, ts, metric, unit):
        rows.append({"workload": workload, "library": lib, "median_s": statistics.median(ts),
                     "min_s": min(ts), "max_s": max(ts), "metric": metric, "unit": unit})
        print(f"  {workload:<16} {lib:<20} {statistics.median(ts):9.4f} s  {metric:10.3f} {unit}",
              file=sys.stderr, flush=True)

    # W1 tiny tasks
    n1 = 50_000 if quick else 200_000
    xs = range(n1)
    ts = _time(lambda: [square(x) for x in xs], reps)
    record("W1 tiny tasks", "serial", ts, statistics.median(ts) / n1 * 1e6, "us/task")
    for lib in libs:
        p = _warm(lib)
        ts = _time(lambda: lib.map(p, square, xs, None), reps)
        lib.close(p)
        record("W1 tiny tasks", lib.name, ts, statistics.median(ts) / n1 * 1e6, "us/task")

    # W2 coarse CPU tasks
    fib_in = [27, 26, 25, 24] * 2 if quick else FIB_INPUTS
    r2 = 1 if quick else 3
    serial = _time(lambda: [fib(n) for n in fib_in], r2)
    record("W2 coarse CPU", "serial", serial, 1.0, "x serial")
    for lib in libs:
        p = _warm(lib)
        ts = _time(lambda: lib.map(p, fib, fib_in, 1), r2)
        lib.close(p)
        record("W2 coarse CPU", lib.name, ts, statistics.median(serial) / statistics.median(ts),
               "x serial")

    # W7 startup
    for method in ("fork", "spawn"):
        for lib in libs:
            if method not in lib.methods and not (method == "spawn" and lib.methods == ("loky",)):
                continue

            def startup():
                p = lib.make(method)
                lib.map(p, noop, [0, 1], 1)
                lib.close(p)

            ts = _time(startup, reps if method == "fork" else max(2, reps - 2))
            record(f"W7 startup {method}", lib.name, ts, statistics.median(ts) * 1e3, "ms")

    # W8 latency
    n8 = 300 if quick else 1000
    for lib in libs:
        p = _warm(lib)

        def roundtrips():
            for _ in range(n8):
                lib.rt(p)

        ts = _time(roundtrips, reps)
        lib.close(p)
        record("W8 latency", lib.name, ts, statistics.median(ts) / n8 * 1e6, "us/call")

    # W5 big arguments
    if np is not None:
        n5 = 8 if quick else 32
        arrays = [np.full(1 << 19, i, dtype=np.float64) for i in range(n5)]  # 4 MiB each
        moved = sum(a.nbytes for a in arrays)
        ts = _time(lambda: [array_sum(a) for a in arrays], reps)
        record("W5 big arguments", "serial", ts, moved / statistics.median(ts) / 1e9, "GB/s")
        for lib in libs:
            p = _warm(lib)
            ts = _time(lambda: lib.map(p, array_sum, arrays, 1), reps)
            lib.close(p)
            record("W5 big arguments", lib.name, ts, moved / statistics.median(ts) / 1e9, "GB/s")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    ap.add_argument("--workers", type=int, default=min(2, pyparallel.cpu_count()) or 1)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    rows = run(args.workers, args.quick)
    ref = {r["workload"]: r["median_s"] for r in rows if r["library"] == "multiprocessing"}
    for r in rows:
        r["vs_mp"] = r["median_s"] / ref[r["workload"]] if r["workload"] in ref else None
    print(f"\nbench_pool: Python {platform.python_version()}, {os.cpu_count()} CPUs "
          f"(usable: {pyparallel.cpu_count()}), {args.workers} workers"
          f"{', quick' if args.quick else ''}; median of repeats, spread = min-max")
    print(f"{'workload':<18}{'library':<21}{'median':>10}{'spread':>20}{'metric':>12} "
          f"{'unit':<9}{'vs mp':>7}")
    for r in rows:
        vs = f"{r['vs_mp']:.2f}x" if r["vs_mp"] is not None else ""
        spread = f"{r['min_s']:.4f}-{r['max_s']:.4f}"
        print(f"{r['workload']:<18}{r['library']:<21}{r['median_s']:>9.4f}s{spread:>20}"
              f"{r['metric']:>12.3f} {r['unit']:<9}{vs:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": platform.python_version(), "cpus": os.cpu_count(),
                       "usable_cpus": pyparallel.cpu_count(), "workers": args.workers,
                       "quick": args.quick, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
