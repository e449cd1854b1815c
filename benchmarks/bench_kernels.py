"""Native kernels: bulk .map at 1..cpu_count threads, against the machine's own limit.

Method
------
- Each measurement is the median of ``--repeats`` runs. A kernel's bulk form at the
  different thread counts is interleaved (one run of each per round), and so are
  weighted_multiply and the list comprehension it replaces, so that slow drift of a shared
  VM hits the variants compared alike. Those two build the same result (a million tuples
  and ints), so they are compared twice: on a fresh heap, where each run maps and faults in
  the ~100 MB of new objects (the state of a new process: the allocator hands freed memory
  back to the system), and on a warm heap, where memory freed earlier is still mapped (the
  usual state of a long-running program).
- Speedup is against the same kernel's .map on 1 thread, measured in the same run.
- The *machine limit* for P-way parallelism is what P independent processes reach: one forked
  process runs the scalar kernel over a share of the work, then P processes each run the same
  share at once; limit = P * t(1 process) / t(P processes). On a shared 2-vCPU VM this is
  typically 1.6-1.9, not 2. "of limit" = speedup / limit.
- "P Python threads" runs the scalar kernel (fib(n), GIL released) on P threads, each
  taking the same share of the items.

Run: ``python benchmarks/bench_kernels.py [--quick] [--repeats N] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import array
import json
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time

import pyparallel
from pyparallel import kernels


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def interleaved_medians(fns, repeats):
    """Median time of each callable of `fns` (name -> callable), one run of each per round."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _child(share, go, out):
    go.wait()
    t0 = time.perf_counter()
    for n in share:
        kernels.fib(n)
    out.put(time.perf_counter() - t0)


def processes_time(share, procs):
    """Wall time for `procs` forked processes each running scalar fib over `share`, timed
    inside the children from a common start signal (process start-up excluded)."""
    ctx = multiprocessing.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=_child, args=(share, go, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    time.sleep(0.05)
    go.set()
    elapsed = max(out.get(timeout=600) for _ in ps)
    for p in ps:
        p.join()
    return elapsed


def python_threads_time(items, nthreads):
    shares = [items[i::nthreads] for i in range(nthreads)]

    def run(share):
        for n in share:
            kernels.fib(n)

    ts = [threading.Thread(target=run, args=(s,)) for s in shares]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    ncpu = pyparallel.cpu_count()
    fib_n = 32 if args.quick else 35
    per_thread = 8
    levels = sorted({1, 2, ncpu} | set(range(1, ncpu + 1, max(1, ncpu // 4))))

    print(f"pyparallel {pyparallel.__version__} bench_kernels: Python {platform.python_version()}, "
          f"{platform.machine()}, cpu_count()={ncpu}, os.cpu_count()={os.cpu_count()}, "
          f"OpenMP={kernels.openmp}, repeats={repeats}")

    rows = []

    # --- fib: the machine limit, .map at every level, P Python threads ---
    items = [fib_n] * (per_thread * ncpu)
    one_share = [fib_n] * per_thread
    base, _ = median_time(lambda: kernels.fib.map(items, threads=1), repeats)
    for p in levels:
        if p == 1:
            continue
        limit_rounds = []
        for _ in range(repeats):
            t1 = processes_time(one_share, 1)
            tp = processes_time(one_share, p)
            limit_rounds.append(p * t1 / tp)
        limit = statistics.median(limit_rounds)
        t_map, _ = median_time(lambda: kernels.fib.map(items, threads=p), repeats)
        t_thr, _ = median_time(lambda: python_threads_time(items, p), repeats)
        rows.append(dict(kernel="fib", variant=f"{p} processes (machine limit)", threads=p,
                         seconds=None, speedup=limit, efficiency=limit / p, of_limit=1.0))
        rows.append(dict(kernel="fib", variant=f"fib.map(threads={p})", threads=p, seconds=t_map,
                         speedup=base / t_map, efficiency=base / t_map / p,
                         of_limit=(base / t_map) / limit))
        rows.append(dict(kernel="fib", variant=f"{p} Python threads x fib(n)", threads=p,
                         seconds=t_thr, speedup=base / t_thr, efficiency=base / t_thr / p,
                         of_limit=(base / t_thr) / limit))
    rows.insert(0, dict(kernel="fib", variant="fib.map(threads=1)", threads=1, seconds=base,
                        speedup=1.0, efficiency=1.0, of_limit=None))

    # --- the other kernels' bulk forms at each level ---
    cube_items = [2_000_000 if args.quick else 8_000_000] * (per_thread * ncpu)
    sq_items = list(range(500_000 if args.quick else 2_000_000))
    wm_items = [("a" if i % 2 else "b", i) for i in range(200_000 if args.quick else 1_000_000)]
    wm_weights = {"a": 2, "b": 3}
    nbuf = 2_000_000 if args.quick else 16_000_000
    buf_a = array.array("d", bytes(8 * nbuf))
    buf_out = array.array("d", bytes(8 * nbuf))
    others = [
        ("cube_loop", f"cube_loop.map({len(cube_items)} x {cube_items[0]:_})",
         lambda t: kernels.cube_loop.map(cube_items, threads=t)),
        ("square", f"square.map(range({len(sq_items):_}))",
         lambda t: kernels.square.map(sq_items, threads=t)),
        ("weighted_multiply", f"weighted_multiply.map({len(wm_items):_} items)",
         lambda t: kernels.weighted_multiply.map(wm_items, wm_weights, threads=t)),
        ("weighted_multiply_buffer", f"weighted_multiply_buffer({nbuf:_} float64)",
         lambda t: kernels.weighted_multiply_buffer(buf_a, buf_a, out=buf_out, threads=t)),
    ]
    # weighted_multiply against the Python it replaces, one thread (the products of plain
    # numbers; the comprehension's own result as the reference), interleaved, on a fresh heap
    # and then on a warm one: objects made and then freed but for one in 500, which keeps
    # their memory mapped and faulted in for the runs to reuse
    wm_fns = {"lc": lambda: [(k, n, n * wm_weights[k]) for k, n in wm_items],
              "kernel": lambda: kernels.weighted_multiply(wm_items, wm_weights)}
    ballast = None
    for heap, suffix in (("fresh heap", ""), ("warm heap", ", warm heap")):
        if suffix:
            ballast = [(i, i + 10**6, None) for i in range(3 * len(wm_items))][::500]
        t = interleaved_medians(wm_fns, max(repeats, 5))
        rows.append(dict(kernel="weighted_multiply",
                         variant=f"list comprehension (reference){suffix}", threads=1,
                         seconds=t["lc"], speedup=1.0, efficiency=1.0, of_limit=None))
        rows.append(dict(kernel="weighted_multiply",
                         variant=f"weighted_multiply({len(wm_items):_} items) vs the "
                                 f"comprehension, {heap}",
                         threads=1, seconds=t["kernel"], speedup=t["lc"] / t["kernel"],
                         efficiency=t["lc"] / t["kernel"], of_limit=None))
    del ballast
    for name, label, fn in others:  # each thread count's runs interleaved with the others'
        t = interleaved_medians({p: (lambda p=p: fn(p)) for p in levels}, repeats)
        t1 = t[1]
        for p in levels:
            tp = t[p]
            rows.append(dict(kernel=name, variant=f"{label}, threads={p}", threads=p, seconds=tp,
                             speedup=t1 / tp, efficiency=t1 / tp / p, of_limit=None))

    print(f"\n{'variant':<70} {'seconds':>9} {'speedup':>8} {'effic.':>7} {'of limit':>9}")
    for r in rows:
        sec = f"{r['seconds']:.4f}" if r["seconds"] is not None else "-"
        lim = f"{100 * r['of_limit']:.0f}%" if r["of_limit"] is not None else ""
        print(f"{r['variant']:<70} {sec:>9} {r['speedup']:>7.2f}x {100 * r['efficiency']:>6.0f}% {lim:>9}")
    print("\nspeedup: vs the same call on 1 thread; of limit: speedup / what independent processes reach")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(python=platform.python_version(), cpu_count=ncpu, openmp=kernels.openmp,
                           repeats=repeats, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
