"""Draw bench_pool's results (its --json file) as a chart: grouped bars of each library's
median time relative to multiprocessing.Pool's in the same run, per workload, log scale
(lower is better; the dashed line at 1 is multiprocessing.Pool), with the machine, the
Python version and the date of the run in the title.

Rows without a ratio (no multiprocessing row for that workload), the serial reference and
the bare-fork floor are left out: the chart compares libraries. `make bench` runs
bench_pool.py --json and then this script.

Usage: python benchmarks/plot_results.py RESULTS.json [-o benchmarks/results.png]
Needs matplotlib: pip install pyparallel[bench]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

NOT_LIBRARIES = {"serial", "bare os.fork+exit", "multiprocessing", "pyparallel progress"}
# Fixed colours, so that a library looks the same in every chart.
COLOURS = {"pyparallel": "#d62728", "concurrent.futures": "#1f77b4",
           "joblib (loky)": "#2ca02c", "mpire": "#9467bd"}


def load(path: str) -> dict:
    """The results file, checked for what the chart needs."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a bench_pool.py --json file (no 'rows' list)")
    for i, r in enumerate(data["rows"]):
        missing = {"workload", "library", "vs_mp"} - set(r)
        if missing:
            raise ValueError(f"{path}: row {i} lacks {', '.join(sorted(missing))}")
    return data


def title(data: dict, path: str) -> str:
    cpu = data.get("cpu_model") or "unknown CPU"
    cores = data.get("cpus")
    usable = data.get("usable_cpus")
    cores_s = f"{cores} CPUs" if cores else "? CPUs"
    if usable and usable != cores:
        cores_s += f" ({usable} usable)"
    date = data.get("date") or time.strftime("%Y-%m-%d", time.localtime(os.path.getmtime(path)))
    run = [f"{data['workers']} workers" if data.get("workers") else None,
           f"Python {data['python']}" if data.get("python") else None,
           "quick" if data.get("quick") else None, date]
    return ("bench_pool: time relative to multiprocessing.Pool (lower is better)\n"
            f"{cpu}, {cores_s}; " + ", ".join(x for x in run if x))


def table(data: dict) -> tuple[list[str], list[str], dict]:
    """(workloads, libraries, {(workload, library): ratio}) in first-seen order."""
    workloads, libraries, ratio = [], [], {}
    for r in data["rows"]:
        if r["library"] in NOT_LIBRARIES or r["vs_mp"] is None:
            continue
        if not (isinstance(r["vs_mp"], (int, float)) and r["vs_mp"] > 0):
            raise ValueError(f"ratio of {r['library']} in {r['workload']}: {r['vs_mp']!r}")
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
        if r["library"] not in libraries:
            libraries.append(r["library"])
        ratio[r["workload"], r["library"]] = float(r["vs_mp"])
    return workloads, libraries, ratio


def _label(y: float) -> str:
    return f"{y:.0f}x" if y >= 10 else f"{y:.2f}x"


def plot(data: dict, path: str, out: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install pyparallel[bench]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads, libraries, ratio = table(data)
    if not ratio:
        raise ValueError(f"{path}: no row with a ratio against multiprocessing.Pool")
    n = len(libraries)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(workloads) + 2), 5.2))
    palette = plt.get_cmap("tab10")
    for j, lib in enumerate(libraries):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            x = i - 0.4 + width * (j + 0.5)
            if (w, lib) in ratio:
                xs.append(x)
                ys.append(ratio[w, lib])
            else:  # this library has no such case (joblib has no fork start method)
                ax.annotate("n/a", (x, 0), xycoords=("data", "axes fraction"), ha="center",
                            va="bottom", fontsize=6, xytext=(0, 2), textcoords="offset points")
        colour = COLOURS.get(lib, palette(j % 10))
        bars = ax.bar(xs, ys, width * 0.92, label=lib, color=colour)
        for b, y in zip(bars, ys):
            ax.annotate(_label(y), (b.get_x() + b.get_width() / 2, y), ha="center",
                        va="bottom", fontsize=7 if n < 5 else 6, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="multiprocessing.Pool")
    ax.set_yscale("log")
    lo, hi = min(ratio.values()), max(ratio.values())
    ax.set_ylim(10 ** math.floor(math.log10(min(lo, 1.0) / 1.5)),
                10 ** math.ceil(math.log10(max(hi, 1.0) * 1.5)))
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([w.replace(" ", "\n", 1) for w in workloads], fontsize=9)
    ax.set_ylabel("median time / multiprocessing.Pool's (log scale)")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.set_title(title(data, path), fontsize=10)
    ax.legend(fontsize=8, ncol=n + 1, loc="upper center", bbox_to_anchor=(0.5, -0.13),
              frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="bench_pool.py --json output")
    ap.add_argument("-o", "--output", default=os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "results.png"), help="PNG to write (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        data = load(args.results)
        plot(data, args.results, args.output)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    except ImportError as e:
        print(f"plot_results.py: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
