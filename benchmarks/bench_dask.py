"""pyparallel's dask backend against plain Dask code written the way Dask's documentation
shows, on the same cluster, in one run.

The cluster: ``--address`` of a running scheduler, or (default) one started here on
127.0.0.1 as a user would: ``dask scheduler`` and ``--workers`` (2) ``dask worker --nthreads 1
--no-dashboard`` processes, torn down at the end.

Workloads:
  W1 tiny tasks   square over range(200_000) (--quick: 20_000)
                    pyparallel   Pool(backend="dask").map(square, xs)
                    per-item     client.gather(client.map(square, xs)): a future per item (run
                                 on 20_000 items, scaled: ~5 ms per future on 2 cores)
                    hand-batched client.map over 4 ranges per worker, each a list comprehension
  W2 coarse CPU   naive Python fib(N) for 12 tasks (N = 27; --quick: 24)
                    pyparallel   Pool.map(fib, [N] * 12)
                    dask         client.gather(client.map(fib, [N] * 12, pure=False))
  W5 big argument a 100 MB numpy array (--quick: 20 MB) read by 50 tasks
                    pyparallel   Pool.starmap(pick, [(a, k) for k in range(50)], chunksize=1)
                    scatter      [a] = client.scatter([a]); client.map(pick, [a] * 50, ks)
                    per-task     client.map(pick, [a] * 10, ks): the array in every task's graph
                                 (10 tasks only: 5 GB through the scheduler otherwise), shown per
                                 50 tasks (x5)

Method: the variants take turns within each repeat; each runs once untimed first (the
workers import and warm up). The median of 3 repeats (--repeats; the per-item W1 and per-task
W5 baselines, slow by design, run once) is reported with the spread; "vs best dask" divides by
the fastest plain-Dask variant's median of the same run (lower is better).

Usage: python benchmarks/bench_dask.py [--quick] [--repeats N] [--workers N]
                                       [--address tcp://host:port] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import distributed
import numpy as np

import pyparallel


def square(x):
    return x * x


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def pick(a, k):
    return float(a[k])


def batch_square(chunk):
    return [x * x for x in chunk]


# ---- a local cluster ----


def start_cluster(workers):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    exe = os.path.join(os.path.dirname(sys.executable), "dask")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "dask"]
    log = tempfile.TemporaryFile()
    procs = [subprocess.Popen(cmd + ["scheduler", "--host", "127.0.0.1", "--port", str(port),
                                     "--no-dashboard"], stdout=log, stderr=log,
                              start_new_session=True)]
    for i in range(workers):
        procs.append(subprocess.Popen(cmd + ["worker", address, "--nthreads", "1",
                                             "--no-dashboard", "--host", "127.0.0.1"],
                                      stdout=log, stderr=log, start_new_session=True))
    return address, procs


def stop_cluster(procs):
    for p in procs[::-1]:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


# ---- timing ----


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(args):
    quick = args.quick
    n1 = 20_000 if quick else 200_000
    fib_n = 24 if quick else 27
    big_mb = 20 if quick else 100
    repeats = args.repeats or 3
    procs = []
    address = args.address
    if address is None:
        address, procs = start_cluster(args.workers)
    try:
        client = distributed.Client(address, timeout=60, set_as_default=False)
        client.wait_for_workers(args.workers if procs else 1, timeout=120)
        pool = pyparallel.Pool(backend="dask", client=client)
        threads = pool._processes
        xs = list(range(n1))
        a = np.ones(big_mb << 17, dtype=np.float64)
        ks = list(range(50))
        expected1 = [x * x for x in xs]
        chunk = -(-n1 // (4 * threads))
        chunks = [range(i, min(i + chunk, n1)) for i in range(0, n1, chunk)]
        few = xs[:20_000]  # per-item futures: 20k of them, scaled to n1

        def hand_batched():
            return [y for part in client.gather(client.map(batch_square, chunks, pure=False))
                    for y in part]

        def scatter_once():
            [fa] = client.scatter([a])
            return client.gather(client.map(pick, [fa] * 50, ks, pure=False))

        variants = {
            "W1": [("pyparallel", lambda: pool.map(square, xs), repeats),
                   (f"dask per-item (x{n1 // len(few)})",
                    lambda: client.gather(client.map(square, few, pure=False)), 1),
                   ("dask hand-batched", hand_batched, repeats)],
            "W2": [("pyparallel", lambda: pool.map(fib, [fib_n] * 12), repeats),
                   ("dask", lambda: client.gather(client.map(fib, [fib_n] * 12, pure=False)),
                    repeats)],
            "W5": [("pyparallel", lambda: pool.starmap(pick, [(a, k) for k in ks],
                                                       chunksize=1), repeats),
                   ("dask scatter", scatter_once, repeats),
                   ("dask per-task (x5)",
                    lambda: client.gather(client.map(pick, [a] * 10, ks[:10], pure=False)), 1)],
        }
        checks = {"W1": expected1, "W2": [fib(fib_n)] * 12, "W5": [1.0] * 50}
        rows = []
        for w, vs in variants.items():
            if args.only and w not in args.only:
                continue
            times = {name: [] for name, _, _ in vs}
            for name, fn, _ in vs:  # warm up, and check the results
                if name.startswith("dask per"):
                    continue
                out = fn()
                assert out == checks[w], (w, name)
            for r in range(repeats):
                for name, fn, reps in vs:
                    if r < reps:
                        times[name].append(timed(fn)[0])
            for name, _, _ in vs:
                ts = times[name]
                scale = int(name.rsplit("(x", 1)[1].rstrip(")")) if "(x" in name else 1
                rows.append({"workload": w, "variant": name,
                             "median": statistics.median(ts) * scale,
                             "min": min(ts) * scale, "max": max(ts) * scale,
                             "repeats": len(ts)})
        pool.terminate()
        pool.join()
        client.close()
    finally:
        if procs:
            stop_cluster(procs)
    best = {}
    for r in rows:
        if r["variant"] != "pyparallel" and not r["variant"].startswith("dask per"):
            best[r["workload"]] = min(best.get(r["workload"], float("inf")), r["median"])
    for r in rows:
        r["vs_best_dask"] = r["median"] / best[r["workload"]] if r["workload"] in best else None
    return {"n_tiny": n1, "fib": fib_n, "big_mb": big_mb, "threads": threads}, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--address", default=None, help="a running scheduler (default: start one)")
    ap.add_argument("--only", default=None, help="comma-separated workloads: W1,W2,W5")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    args.only = set(args.only.split(",")) if args.only else None
    meta, rows = run(args)
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, distributed "
          f"{distributed.__version__}, {meta['threads']} worker threads; W1 {meta['n_tiny']} "
          f"items, W2 fib({meta['fib']}) x 12, W5 {meta['big_mb']} MB x 50 tasks")
    print(f"{'workload':9} {'variant':20} {'median s':>10} {'min-max s':>17} {'n':>3} "
          f"{'vs best dask':>12}")
    for r in rows:
        ratio = f"{r['vs_best_dask']:.2f}" if r["vs_best_dask"] is not None else "-"
        print(f"{r['workload']:9} {r['variant']:20} {r['median']:10.3f} "
              f"{r['min']:8.3f}-{r['max']:<8.3f} {r['repeats']:3d} {ratio:>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": platform.python_version(), "cpus": os.cpu_count(), **meta,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
