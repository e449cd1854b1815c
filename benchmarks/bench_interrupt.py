"""SIGINT -> KeyboardInterrupt latency of running kernels, and the scalar-call overhead.

For each case a fresh child process starts the kernel call (fib(70) runs for hours), the
parent sends SIGINT 0.3 s later and the child reports, from its own monotonic clock, when the
KeyboardInterrupt reached Python code; latency = that time - the time the signal was sent
(both CLOCK_MONOTONIC, same machine). Median and spread of --repeats runs.

    python benchmarks/bench_interrupt.py [--repeats N] [--json FILE]
"""
import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import timeit

CHILD = r"""
import sys, time
from pyparallel import kernels
calls = {"fib(70)": lambda: kernels.fib(70), "fib.map([70]*4)": lambda: kernels.fib.map([70] * 4),
         "cube_loop(2**40)": lambda: kernels.cube_loop(2 ** 40)}
call = calls[sys.argv[1]]
print("ready", flush=True)
try:
    call()
except KeyboardInterrupt:
    print(time.monotonic(), flush=True)
"""


def one(case):
    p = subprocess.Popen([sys.executable, "-c", CHILD, case], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        sent = time.monotonic()
        p.send_signal(signal.SIGINT)
        line = p.stdout.readline().strip()
        p.wait(30)
        return float(line) - sent
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    from pyparallel import kernels
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"OpenMP {kernels.openmp}, {args.repeats} repeats")
    rows = []
    for case in ("fib(70)", "fib.map([70]*4)", "cube_loop(2**40)"):
        ms = [1000 * one(case) for _ in range(args.repeats)]
        rows.append({"case": case, "median_ms": statistics.median(ms), "min_ms": min(ms),
                     "max_ms": max(ms)})
    for expr in ("fib(1)", "fib(20)", "fib(30)"):
        t = timeit.Timer(expr, globals={"fib": kernels.fib})
        n, _ = t.autorange()
        per = [t.timeit(n) / n * 1e6 for _ in range(args.repeats)]
        rows.append({"case": expr + " call", "median_us": statistics.median(per),
                     "min_us": min(per), "max_us": max(per)})
    print(f"{'case':<22}{'median':>12}{'min':>12}{'max':>12}")
    for r in rows:
        unit = "ms" if "median_ms" in r else "us"
        print(f"{r['case']:<22}" + "".join(f"{r[k + '_' + unit]:>10.3f}{unit}"
                                            for k in ("median", "min", "max")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": platform.python_version(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
