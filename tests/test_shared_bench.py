"""The shared-memory benchmark runs (one quick repeat) and writes its JSON; no timing asserts
(thresholds belong to the benchmark run, not to tests)."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_bench_shared_quick_smoke(tmp_path):
    path = os.path.join(HERE, "..", "benchmarks", "bench_shared.py")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, path, "--quick", "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["cpu_count"] == os.cpu_count() and len(data["rows"]) == 11
    assert all(r["median"] > 0 for r in data["rows"])
    for word in ("Python", "W6 counter", "W5", "lock round trip", "vs mp"):
        assert word in proc.stdout
