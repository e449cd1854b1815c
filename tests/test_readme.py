"""The README's quick tour runs as written: its code block is tests/readme_tour.py, word for
word, and running that script prints what the README says it prints."""
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOUR = os.path.join(HERE, "readme_tour.py")

pytestmark = pytest.mark.usefixtures("no_leaks")


def _tour_block():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Quick tour", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "no python block in the README's Quick tour"
    return m.group(1)


def test_the_readme_tour_is_the_tested_script():
    with open(TOUR) as f:
        assert _tour_block() == f.read()


def test_the_readme_tour_runs_as_written(tmp_path):
    pytest.importorskip("numpy")
    out = subprocess.run([sys.executable, TOUR], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line.rstrip() for line in out.stdout.splitlines()]
    assert lines[0] == str([x * x for x in range(10)])
    assert lines[1] == str([x + 1 for x in range(5)])
    assert lines[2] == "[75025, 121393, 196418, 317811, 514229]"
    assert lines[3] == f"True {[i * i for i in range(8)]}"
    assert lines[4].startswith("timed out: task 7 of the call")
    assert lines[5:] == ["100000 of 100000", "5", "echo hello 0 hello", "exit 3 3"]
