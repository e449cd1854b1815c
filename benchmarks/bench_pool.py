"""pyparallel.Pool against multiprocessing.Pool, concurrent.futures.ProcessPoolExecutor,
joblib (loky) and mpire (when installed), serial as the reference, in one run.

Workloads (2 workers by default, or --workers N):
  W1 tiny tasks     map(square, range(200_000)) on a warm pool          us per task
                    (pyparallel also with progress=True: a tqdm bar on stderr)
  W2 coarse CPU     naive Python fib over [30,29,28,27,26,25]*2, chunksize 1   speedup vs serial
  W3 tuples         map(f, items) over 2,000,000 ("type1", i) tuples, f returning
                    (kind, i, i * w[kind]) (default chunksize)                  us per item
  W7 startup        create a pool, map a no-op over 2 items, close, join (fork, forkserver,
                    spawn); under fork also the floor: fork the workers, let them exit, reap
                    them
  W8 latency        1,000 sequential apply_async(noop).get() on a warm pool  us per round trip
  W5 big arguments  32 numpy arrays of 4 MiB, the task returns the sum (chunksize 1)  GB/s
  W6 big results    32 tasks, each returning a 4 MiB float64 array (chunksize 1)   GB/s

Method: the libraries take turns within each repeat (so a drift of the machine's speed is
shared by all; the order turns by one case each repeat, so that no library always follows
the same one and finds the machine in the state that one left), each turn on a fresh pool
made and warmed up outside the timed region (except in W7, which times exactly that) and
closed after it, so one library's workers run at a time (in W7 under fork, each turn also
waits until the processes of the one before have exited);
W1, W8 and W5 run their work once untimed first (a pool in use: its buffers and caches warm).
5 repeats (--quick: 3; W2: 3, W7 fork: 15, W7 forkserver and spawn: 3); the median is reported with the
spread (min-max); "vs mp" is the median divided by multiprocessing.Pool's median from the
same run (lower is better). Caveat: on a machine shared with other work, timings are noisy;
compare ratios from one run, not absolute times across runs.

Usage: python benchmarks/bench_pool.py [--quick] [--repeats N] [--workers N] [--only W1,W7,...]
                                      [--json PATH]
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
except ImportError:  # pragma: no cover
    joblib = None
try:
    import mpire
except ImportError:  # pragma: no cover
    mpire = None
try:
    import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def square(x):
    return x * x


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def noop(*_):
    return None


def array_sum(a):
    return float(a.sum())


W3_WEIGHTS = {"type1": 3, "type2": 5}


def kind_weight(item):
    kind, i = item
    return (kind, i, i * W3_WEIGHTS[kind])


def big_array(i):
    return np.full(1 << 19, i, dtype=np.float64)  # 4 MiB


FIB_INPUTS = [30, 29, 28, 27, 26, 25] * 2


def _stdlib_chunksize(n, workers):
    c, extra = divmod(n, workers * 4)
    return c + bool(extra)


# ---- adapters: (make(method), map(pool, f, xs, chunksize), rt(pool), close(pool)) ----


class Lib:
    def __init__(self, name, make, map_, rt, close, methods=("fork", "forkserver", "spawn")):
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
        # joblib as people use it for maps: Parallel(...)(delayed(f)(x) ...), which
        # memory-maps numpy arrays over 1 MB instead of pickling them; single round trips
        # (W8) go to the loky executor underneath, as Parallel per call costs milliseconds.
        # Its workers are shut down on close, so that the next pool starts its own.
        def jl_make(m):
            return joblib.Parallel(n_jobs=workers, backend="loky").__enter__()

        def jl_map(p, f, xs, c):
            return p(joblib.delayed(f)(x) for x in xs)

        def jl_rt(p):
            return p._backend._workers.submit(noop).result()  # the executor under Parallel

        def jl_close(p):
            ex = p._backend._workers
            p.__exit__(None, None, None)
            ex.shutdown(wait=True)

        libs.append(Lib("joblib (loky)", jl_make, jl_map, jl_rt, jl_close, methods=("loky",)))
    if mpire is not None:
        libs.append(Lib("mpire", lambda m: mpire.WorkerPool(workers, start_method=m),
                        lambda p, f, xs, c: p.map(f, xs, chunk_size=c),
                        lambda p: p.apply_async(noop).get(),
                        lambda p: p.terminate()))
    return libs


def _bare_forks(n):
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)


def _children():
    """The pids of this process's child processes still there (zombies included), from
    /proc; empty where there is none."""
    me = f"/proc/{os.getpid()}/task"
    try:
        tasks = os.listdir(me)
    except OSError:
        return []
    kids = []
    for t in tasks:
        try:
            with open(f"{me}/{t}/children") as f:
                kids += f.read().split()
        except OSError:
            pass
    return kids


def _settle(background, limit=2.0):
    """Wait (at most `limit` s) until the processes the previous turn started are gone (all
    children but those of `background`, there before the turns began), so that their exits
    do not run inside the next turn's timed region."""
    deadline = time.monotonic() + limit
    while set(_children()) - background and time.monotonic() < deadline:
        time.sleep(0.001)


def _rss_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return "?"


def _time_once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _warm(lib, method="fork"):
    p = lib.make(method if method in lib.methods else lib.methods[0])
    lib.map(p, square, [1, 2], 1)
    return p


WORKLOADS = ("W1", "W2", "W3", "W7", "W8", "W5", "W6")


def run(workers, quick, only=WORKLOADS, repeats=None):
    reps = repeats or (3 if quick else 5)
    rows = []
    libs = _libs(workers)

    def record(workload, lib, ts, metric, unit):
        rows.append({"workload": workload, "library": lib, "median_s": statistics.median(ts),
                     "min_s": min(ts), "max_s": max(ts), "metric": metric, "unit": unit})
        print(f"  {workload:<21} {lib:<20} {statistics.median(ts):9.4f} s  {metric:10.3f} {unit}",
              file=sys.stderr, flush=True)

    repeats_override = repeats

    def measure(workload, cases, repeats, metric, unit, warm=True, rehearse=True,
                settle=False):
        """cases: [(name, lib or None, fn(pool))]. The cases take turns within each repeat,
        so a drift of the machine's speed is shared by all, in an order that turns by one
        each repeat. With settle=True each turn first waits for the processes of the one
        before to be gone. With warm=True each turn gets a
        fresh pool, warmed up outside the timed region (and with rehearse=True, given the
        same work once untimed: the steady state of a pool in use) and closed after it (one
        library's pool at a time: idle workers of the others cannot disturb it); otherwise
        fn makes its own. metric(median, medians) -> the reported number."""
        times = {name: [] for name, _, _ in cases}
        background = set(_children()) if settle else None
        for r in range(repeats_override or repeats):
            k = r % len(cases)
            for name, lib, fn in cases[k:] + cases[:k]:
                if settle:
                    _settle(background)
                pool = _warm(lib) if (warm and lib is not None) else None
                try:
                    if rehearse:
                        fn(pool)
                    times[name].append(_time_once(lambda: fn(pool)))
                finally:
                    if pool is not None:
                        lib.close(pool)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        for name, _, _ in cases:
            record(workload, name, times[name], metric(medians[name], medians), unit)

    if "W1" in only:  # tiny tasks
        n1 = 50_000 if quick else 200_000
        xs = range(n1)
        cases = [("serial", None, lambda _: [square(x) for x in xs])]
        cases += [(lib.name, lib, lambda p, lib=lib: lib.map(p, square, xs, None)) for lib in libs]
        # the cost of a progress bar (tqdm, advanced as chunks finish): same pool, same run
        if tqdm is not None:
            cases.insert(2, ("pyparallel progress", libs[0],
                             lambda p: p.map(square, xs, progress=True)))
        measure("W1 tiny tasks", cases, reps, lambda t, m: t / n1 * 1e6, "us/task")

    if "W2" in only:  # coarse CPU tasks
        fib_in = [27, 26, 25, 24] * 2 if quick else FIB_INPUTS
        cases = [("serial", None, lambda _: [fib(n) for n in fib_in])]
        cases += [(lib.name, lib, lambda p, lib=lib: lib.map(p, fib, fib_in, 1)) for lib in libs]
        measure("W2 coarse CPU", cases, 1 if quick else 3, lambda t, m: m["serial"] / t,
                "x serial", rehearse=False)

    if "W3" in only:  # everyday objects: tuples in, tuples out
        n3 = 200_000 if quick else 2_000_000
        items = [("type1", i) for i in range(n3)]
        cases = [("serial", None, lambda _: [kind_weight(x) for x in items])]
        # (mpire calls f(*item) for a tuple item: it gets each tuple wrapped in a 1-tuple)
        wrapped = [(x,) for x in items] if mpire is not None else None
        cases += [(lib.name, lib, lambda p, lib=lib: lib.map(
            p, kind_weight, wrapped if lib.name == "mpire" else items, None)) for lib in libs]
        # (not rehearsed: a pool's steady state is reached within the call's first chunks,
        # and a rehearsal would double the run of the slow peers)
        measure("W3 tuples", cases, reps, lambda t, m: t / n3 * 1e6, "us/item", rehearse=False)
        del items, wrapped

    if "W7" in only:  # start-up
        # a fork copies the page tables of this process: its size sets the floor
        print(f"  W7: this process's resident memory is {_rss_mb()} MB", file=sys.stderr)
        for method in ("fork", "forkserver", "spawn"):
            cases = []
            for lib in libs:
                if method not in lib.methods and not (method == "spawn" and lib.methods == ("loky",)):
                    continue

                def startup(_, lib=lib):
                    p = lib.make(method)
                    lib.map(p, noop, [0, 1], 1)
                    lib.close(p)

                cases.append((lib.name, lib, startup))
            if method == "fork":
                # the floor: forking the workers and reaping them, with nothing in between
                cases.insert(0, ("bare os.fork+exit", None, lambda _: _bare_forks(workers)))
            r7 = (5 if quick else 15) if method == "fork" else (2 if quick else 3)
            measure(f"W7 startup {method}", cases, r7, lambda t, m: t * 1e3, "ms", warm=False,
                    rehearse=False, settle=method == "fork")

    if "W8" in only:  # round-trip latency
        n8 = 300 if quick else 1000

        def roundtrips(p, lib):
            for _ in range(n8):
                lib.rt(p)

        cases = [(lib.name, lib, lambda p, lib=lib: roundtrips(p, lib)) for lib in libs]
        measure("W8 latency", cases, reps, lambda t, m: t / n8 * 1e6, "us/call")

    if "W6" in only and np is not None:  # big results
        n6 = 8 if quick else 32
        moved6 = n6 * (4 << 20)
        cases = [("serial", None, lambda _: [big_array(i) for i in range(n6)])]
        cases += [(lib.name, lib, lambda p, lib=lib: lib.map(p, big_array, range(n6), 1))
                  for lib in libs]
        measure("W6 big results", cases, reps, lambda t, m: moved6 / t / 1e9, "GB/s")

    if "W5" in only and np is not None:  # big arguments
        n5 = 8 if quick else 32
        arrays = [np.full(1 << 19, i, dtype=np.float64) for i in range(n5)]  # 4 MiB each
        moved = sum(a.nbytes for a in arrays)
        cases = [("serial", None, lambda _: [array_sum(a) for a in arrays])]
        cases += [(lib.name, lib, lambda p, lib=lib: lib.map(p, array_sum, arrays, 1))
                  for lib in libs]
        measure("W5 big arguments", cases, reps, lambda t, m: moved / t / 1e9, "GB/s")
    return rows


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of every measurement")
    ap.add_argument("--workers", type=int, default=min(2, pyparallel.cpu_count()) or 1)
    ap.add_argument("--only", default=",".join(WORKLOADS),
                    help="comma-separated workloads to run (default: all of %(default)s)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    only = tuple(w.strip().upper() for w in args.only.split(",") if w.strip())
    unknown = set(only) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    rows = run(args.workers, args.quick, only, args.repeats)
    ref = {r["workload"]: r["median_s"] for r in rows if r["library"] == "multiprocessing"}
    for r in rows:
        r["vs_mp"] = r["median_s"] / ref[r["workload"]] if r["workload"] in ref else None
    print(f"\nbench_pool: Python {platform.python_version()}, {os.cpu_count()} CPUs "
          f"(usable: {pyparallel.cpu_count()}), {args.workers} workers"
          f"{', quick' if args.quick else ''}; median of repeats, spread = min-max")
    print(f"{'workload':<22}{'library':<21}{'median':>10}{'spread':>20}{'metric':>12} "
          f"{'unit':<9}{'vs mp':>7}")
    for r in rows:
        vs = f"{r['vs_mp']:.2f}x" if r["vs_mp"] is not None else ""
        spread = f"{r['min_s']:.4f}-{r['max_s']:.4f}"
        print(f"{r['workload']:<22}{r['library']:<21}{r['median_s']:>9.4f}s{spread:>20}"
              f"{r['metric']:>12.3f} {r['unit']:<9}{vs:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": platform.python_version(), "cpus": os.cpu_count(),
                       "cpu_model": _cpu_model(), "date": time.strftime("%Y-%m-%d"),
                       "usable_cpus": pyparallel.cpu_count(), "workers": args.workers,
                       "quick": args.quick, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
