"""The other front doors, side by side with what they replace, in the same run.

1. 50 back-to-back ``Parallel(n_jobs=2)(delayed(f)(i) for i in range(100))`` calls on the
   "pyparallel" joblib backend against joblib's default loky backend (both warm: one
   rehearsal call first, as a notebook's second cell would be).
2. ``submit(f, x).result()`` round trip, and ``map(f, range(200_000))``, with
   pyparallel.ProcessPoolExecutor against concurrent.futures.ProcessPoolExecutor (both
   with warm workers, max_workers=2).
3. Start-up: a second ``get_reusable_pool(2)`` against a fresh ``pp.Pool(2)`` (created and
   its first tiny task answered, then terminated).

Each figure is the median of ``--repeats`` runs (spread: min-max). Usage:
    python benchmarks/bench_fronts.py [--repeats N] [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import statistics
import sys
import time

import pyparallel as pp


def tiny(x):
    return x + 1


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def row(name, ours, theirs, unit_scale=1.0, unit="s"):
    m_o, m_t = statistics.median(ours), statistics.median(theirs)
    return {
        "case": name, "unit": unit,
        "pyparallel": m_o * unit_scale, "pyparallel_min": min(ours) * unit_scale,
        "pyparallel_max": max(ours) * unit_scale,
        "reference": m_t * unit_scale, "reference_min": min(theirs) * unit_scale,
        "reference_max": max(theirs) * unit_scale,
        "speedup": m_t / m_o if m_o else float("inf"),
    }


def bench_joblib(repeats, calls):
    from joblib import Parallel, delayed

    import pyparallel.joblib  # noqa: F401

    def run(backend):
        for _ in range(calls):
            Parallel(n_jobs=2, backend=backend)(delayed(tiny)(i) for i in range(100))

    run("pyparallel")
    run("loky")  # warm both
    ours = timed(lambda: run("pyparallel"), repeats)
    theirs = timed(lambda: run("loky"), repeats)
    return row(f"{calls} x Parallel(n_jobs=2) over 100 items (vs loky)", ours, theirs)


def bench_executor(repeats, n_rt, n_map):
    ours_ex = pp.ProcessPoolExecutor(2)
    std_ex = cf.ProcessPoolExecutor(2)
    rows = []
    try:
        for ex in (ours_ex, std_ex):  # warm: workers started, functions loaded
            list(ex.map(tiny, range(100)))
            ex.submit(tiny, 1).result()

        def rt(ex):
            return lambda: [ex.submit(tiny, i).result() for i in range(n_rt)]

        ours = timed(rt(ours_ex), repeats)
        theirs = timed(rt(std_ex), repeats)
        rows.append(row("submit().result() round trip (vs concurrent.futures)",
                        [t / n_rt for t in ours], [t / n_rt for t in theirs], 1e6, "us"))

        def mp(ex):
            return lambda: list(ex.map(tiny, range(n_map)))

        ours = timed(mp(ours_ex), repeats)
        theirs = timed(mp(std_ex), max(1, min(repeats, 3)))  # the stdlib takes tens of s
        rows.append(row(f"map over {n_map:,} tiny items (vs concurrent.futures)", ours, theirs))
    finally:
        ours_ex.shutdown()
        std_ex.shutdown()
    return rows


def bench_startup(repeats):
    first = pp.get_reusable_pool(2)
    first.apply(tiny, (1,))

    def second():
        pp.get_reusable_pool(2).apply(tiny, (1,))

    def fresh():
        p = pp.Pool(2)
        p.apply(tiny, (1,))
        p.terminate()
        p.join()

    ours = timed(second, repeats)
    theirs = timed(fresh, repeats)
    return row("second get_reusable_pool(2) + first task (vs fresh pp.Pool(2))", ours, theirs,
               1e3, "ms")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = ap.parse_args(argv)
    calls, n_rt, n_map = (5, 200, 20_000) if args.quick else (50, 2000, 200_000)
    rows = []
    try:
        import joblib  # noqa: F401
    except ImportError:
        print("joblib not installed: skipping the joblib case (pip install pyparallel[joblib])")
    else:
        rows.append(bench_joblib(args.repeats, calls))
    rows += bench_executor(args.repeats, n_rt, n_map)
    rows.append(bench_startup(args.repeats))
    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "usable_cpus": pp.cpu_count(), "repeats": args.repeats}
    print(f"pyparallel front doors: Python {info['python']}, {info['cpus']} CPUs "
          f"({info['usable_cpus']} usable), median of {args.repeats}")
    print(f"{'case':66} {'pyparallel':>16} {'reference':>16} {'speedup':>8}")
    for r in rows:
        print(f"{r['case']:66} {r['pyparallel']:>12.3f} {r['unit']:<3} "
              f"{r['reference']:>12.3f} {r['unit']:<3} {r['speedup']:>7.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
