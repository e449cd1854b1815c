"""A big module-level global read by the task function (issue: drop-in fidelity).

``map(f, range(200), chunksize=1)`` where ``f`` (defined in the main script) reads a 50 MB
global: time and the parent's peak RSS, pyparallel.Pool against multiprocessing.Pool under
fork, in the same run, each case in a fresh process; pyparallel also under forkserver and
spawn (the global is then sent once to each worker). Median of --repeats runs.

Usage: python benchmarks/bench_globals.py [--repeats N] [--mb 50] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CASE = r"""
import multiprocessing, multiprocessing.pool, resource, sys, time
import pyparallel as pp
BIG = b"x" * ({mb} << 20)  # touched pages: they count in RSS
def f(i):
    return len(BIG) + i
if __name__ == "__main__":
    lib, method = sys.argv[1], sys.argv[2]
    ctx = multiprocessing.get_context(method)
    P = multiprocessing.pool.Pool if lib == "multiprocessing" else pp.Pool
    with P(2, context=ctx) as p:
        p.map(f, range(2))
        t = time.perf_counter()
        r = p.map(f, range(200), chunksize=1)
        dt = time.perf_counter() - t
    assert r[7] == ({mb} << 20) + 7
    print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

CASES = [("multiprocessing", "fork"), ("pyparallel", "fork"), ("multiprocessing", "forkserver"),
         ("pyparallel", "forkserver"), ("pyparallel", "spawn")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="a 5 MB global")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.quick:
        args.mb = 5
    # a script file, as users run them (multiprocessing's spawn and forkserver re-import it)
    fd, script = tempfile.mkstemp(suffix=".py", prefix="bench_globals_")
    with os.fdopen(fd, "w") as f:
        f.write(CASE.format(mb=args.mb))
    runs = {c: [] for c in CASES}
    try:
        _run(args, script, runs)
    finally:
        os.unlink(script)
    report(args, runs)


def _run(args, script, runs):
    for _ in range(args.repeats):  # the cases take turns
        for lib, method in CASES:
            out = subprocess.run([sys.executable, script, lib, method], capture_output=True,
                                 text=True, timeout=600, check=True)
            dt, rss = map(float, out.stdout.split())
            runs[lib, method].append((dt, rss))


def report(args, runs):
    base_t = statistics.median(t for t, _ in runs["multiprocessing", "fork"])
    base_m = statistics.median(m for _, m in runs["multiprocessing", "fork"])
    rows = []
    print(f"{args.mb} MB global, map(f, range(200), chunksize=1), 2 workers, "
          f"median of {args.repeats}")
    print(f"{'library':16} {'method':11} {'time s':>8} {'vs mp fork':>10} {'peak RSS MB':>12} "
          f"{'vs mp fork':>11}")
    for (lib, method), v in runs.items():
        t = statistics.median(x for x, _ in v)
        m = statistics.median(y for _, y in v)
        rows.append({"library": lib, "method": method, "time_s": t, "peak_rss_mb": m,
                     "time_vs_mp_fork": t / base_t, "rss_above_mp_fork_mb": m - base_m})
        print(f"{lib:16} {method:11} {t:8.3f} {t / base_t:9.2f}x {m:12.0f} {m - base_m:+10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mb": args.mb, "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
