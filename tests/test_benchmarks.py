"""Each benchmark runs (quick, one repeat) and writes its JSON: no timing asserts here
(thresholds belong to the benchmark runs, not to tests)."""
import json
import os
import subprocess
import sys

import _util
import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def run_bench(name, tmp_path, timeout):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, name), "--quick", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_bench_kernels_quick(tmp_path):
    stdout, data = run_bench("bench_kernels.py", tmp_path, 200)
    kernels = {r["kernel"] for r in data["rows"]}
    assert kernels == {"fib", "cube_loop", "square", "weighted_multiply", "weighted_multiply_buffer"}
    assert any("machine limit" in r["variant"] for r in data["rows"])
    assert all(r["seconds"] is None or r["seconds"] > 0 for r in data["rows"])
    assert "of limit" in stdout
    variants = {r["variant"] for r in data["rows"]}
    assert {"list comprehension (reference)", "list comprehension (reference), warm heap"} <= variants
    wm = [r for r in data["rows"] if r["variant"].startswith("weighted_multiply(")]
    assert [r["variant"].rsplit(", ", 1)[1] for r in wm] == ["fresh heap", "warm heap"]
    assert all(r["speedup"] > 0 for r in wm)


def test_bench_shared_quick(tmp_path):
    stdout, data = run_bench("bench_shared.py", tmp_path, 100)
    assert data["cpu_count"] == os.cpu_count() and len(data["rows"]) == 11
    assert all(r["median"] > 0 for r in data["rows"])
    for word in ("Python", "W6 counter", "W5", "pyparallel.Pool", "lock round trip", "vs mp"):
        assert word in stdout


def test_bench_pool_quick(tmp_path):
    stdout, data = run_bench("bench_pool.py", tmp_path, 300)
    seen = {(r["workload"], r["library"]) for r in data["rows"]}
    for w in ("W1 tiny tasks", "W2 coarse CPU", "W3 tuples", "W7 startup fork",
              "W7 startup forkserver", "W7 startup spawn", "W8 latency", "W5 big arguments",
              "W6 big results"):
        assert (w, "pyparallel") in seen and (w, "multiprocessing") in seen
    assert ("W1 tiny tasks", "pyparallel progress") in seen  # tqdm is a test extra
    assert ("W7 startup fork", "bare os.fork+exit") in seen
    mp_rows = [r for r in data["rows"] if r["library"] == "multiprocessing"]
    assert all(r["vs_mp"] == 1.0 for r in mp_rows)
    assert all(r["median_s"] > 0 for r in data["rows"])
    assert "vs mp" in stdout


def _plot(tmp_path, data, out_name="chart.png"):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(data))
    out = tmp_path / out_name
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "plot_results.py"), str(src),
                           "-o", str(out)], capture_output=True, text=True, timeout=120)
    return proc, out


@pytest.mark.skipif(_util.UNDER_ASAN, reason="matplotlib's C++ code under a preloaded ASan "
                    "runtime fails ASan's own __cxa_throw check")
def test_plot_results_renders_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for w in ("W1 tiny tasks", "W8 latency"):
        for lib, vs in (("serial", 0.2), ("pyparallel", 0.45), ("multiprocessing", 1.0),
                        ("concurrent.futures", 2.3), ("mpire", 36.0)):
            rows.append({"workload": w, "library": lib, "median_s": vs, "min_s": vs,
                         "max_s": vs, "metric": 1.0, "unit": "s", "vs_mp": vs})
    rows.append({"workload": "W8 latency", "library": "joblib (loky)", "median_s": 1.8,
                 "min_s": 1.8, "max_s": 1.8, "metric": 1.0, "unit": "s", "vs_mp": 1.8})
    data = {"python": "3.11.7", "cpus": 2, "usable_cpus": 2, "workers": 2, "quick": True,
            "cpu_model": "Test CPU 9000", "date": "2026-01-02", "rows": rows}
    proc, out = _plot(tmp_path, data)
    assert proc.returncode == 0, proc.stderr
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    sys.path.insert(0, BENCH)
    try:
        import plot_results
    finally:
        sys.path.remove(BENCH)
    title = plot_results.title(data, str(tmp_path / "results.json"))
    assert "Test CPU 9000, 2 CPUs" in title and "2026-01-02" in title
    workloads, libraries, ratio = plot_results.table(data)
    assert workloads == ["W1 tiny tasks", "W8 latency"]
    assert libraries == ["pyparallel", "concurrent.futures", "mpire", "joblib (loky)"]
    assert ratio["W8 latency", "mpire"] == 36.0 and ("W1 tiny tasks", "joblib (loky)") not in ratio


def test_plot_results_rejects_a_file_that_is_not_bench_pool_json(tmp_path):
    pytest.importorskip("matplotlib")
    proc, out = _plot(tmp_path, {"rows": [{"workload": "W1"}]})
    assert proc.returncode == 2 and "lacks library, vs_mp" in proc.stderr
    assert not out.exists()


def test_bench_fronts_quick(tmp_path):
    stdout, data = run_bench("bench_fronts.py", tmp_path, 300)
    cases = " ".join(r["case"] for r in data["rows"])
    for word in ("Parallel(n_jobs=2)", "round trip", "map over", "get_reusable_pool"):
        assert word in cases
    assert all(r["pyparallel"] > 0 and r["reference"] > 0 for r in data["rows"])
    assert "speedup" in stdout


def test_bench_globals_quick(tmp_path):
    stdout, data = run_bench("bench_globals.py", tmp_path, 300)
    cases = {(r["library"], r["method"]) for r in data["rows"]}
    assert ("pyparallel", "fork") in cases and ("multiprocessing", "fork") in cases
    assert all(r["time_s"] > 0 and r["peak_rss_mb"] > 0 for r in data["rows"])
    assert "vs mp fork" in stdout


def test_bench_load_quick(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_load.py"), "--quick",
                           "--repeats", "1", "--loads", "0,1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["cpu_count"] == os.cpu_count()
    seen = {(r["workload"], r["busy"], r["library"]) for r in data["rows"]}
    for w in ("W8 latency", "W1 tiny tasks", "W9 burst", "Q ping-pong"):
        for busy in (0, 1):
            assert (w, busy, "pyparallel") in seen and (w, busy, "multiprocessing") in seen
    for method in ("fork", "forkserver", "spawn"):
        assert (f"W10 recycle {method}", 0, "pyparallel") in seen
    assert all(r["median"] > 0 for r in data["rows"])
    assert all(r["vs_mp"] == 1.0 for r in data["rows"] if r["library"] == "multiprocessing")
    assert "busy=1" in proc.stdout
