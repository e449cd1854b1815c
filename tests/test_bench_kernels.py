"""bench_kernels runs (quick, one repeat) and writes its JSON; no timing asserts."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_bench_kernels_quick_smoke(tmp_path):
    path = os.path.join(HERE, "..", "benchmarks", "bench_kernels.py")
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, path, "--quick", "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    kernels = {r["kernel"] for r in data["rows"]}
    assert kernels == {"fib", "cube_loop", "square", "weighted_multiply", "weighted_multiply_buffer"}
    assert any("machine limit" in r["variant"] for r in data["rows"])
    assert all(r["seconds"] is None or r["seconds"] > 0 for r in data["rows"])
    assert "of limit" in proc.stdout
