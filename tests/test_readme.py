"""The README's code runs as written: the quick tour's block is tests/readme_tour.py, word for
word, and running that script prints what the README says it prints; every other python block
runs as printed in a fresh interpreter (the Dask block on a scheduler and worker started with
the README's own commands, its placeholder address replaced by theirs), and so do the shell
commands of the command runner (on command files the test writes). The installation blocks
(make demo/test, pip install) are what builds the environment these tests run in."""
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


# ---- every other code block of the README, as printed ----

def _blocks(lang):
    """(heading, code) of each ```lang block of the README, in order."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    out, heading = [], ""
    for m in re.finditer(r"^(#+ [^\n]*)$|^```(\w+)\n(.*?)^```$", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("# ")
        elif m.group(2) == lang:
            out.append((heading, m.group(3)))
    return out


_PYTHON_BLOCKS = [(h, code) for h, code in _blocks("python") if h != "Quick tour"]
_DASK_ADDRESS = "tcp://scheduler-host:8786"   # the README's placeholder


def test_the_readme_blocks_are_all_seen():
    headings = [h for h, _ in _blocks("python")]
    assert headings[0] == "Quick tour"   # run by the tests above
    assert len(_PYTHON_BLOCKS) == len(headings) - 1 >= 8


def _run_block(code, cwd, timeout=240):
    path = os.path.join(cwd, "block.py")
    with open(path, "w") as f:
        f.write(code)
    return subprocess.run([sys.executable, path], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("heading,code", [pytest.param(h, c, id=h.split(":")[0][:30])
                                          for h, c in _PYTHON_BLOCKS
                                          if _DASK_ADDRESS not in c])
def test_readme_block_runs_as_printed(heading, code, tmp_path):
    for mod in re.findall(r"^import (\w+)", code, re.M):
        pytest.importorskip(mod)
    out = _run_block(code, str(tmp_path))
    assert out.returncode == 0, out.stderr


def _dask_cluster_commands(address):
    """The README's commands that start a scheduler and a worker, on `address`."""
    [block] = [c for h, c in _blocks("sh") if h.startswith("Scale-out")]
    host_port = address.split("://")[1]
    port = host_port.rsplit(":", 1)[1]
    cmds = []
    for line in block.splitlines():
        line = line.split("#")[0].strip()
        line = line.replace("0.0.0.0", "127.0.0.1").replace("8786", port)
        line = line.replace("tcp://scheduler-host:" + port, address)
        cmds.append(line.split())
    return cmds


def test_readme_dask_block_runs_as_printed(tmp_path):
    pytest.importorskip("distributed")
    import signal
    import socket

    [code] = [c for _, c in _PYTHON_BLOCKS if _DASK_ADDRESS in c]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    bindir = os.path.dirname(sys.executable)
    procs = []
    try:
        for cmd in _dask_cluster_commands(address):
            assert cmd[0] == "dask"
            cmd = [os.path.join(bindir, "dask")] + cmd[1:] + ["--host", "127.0.0.1"] * (
                cmd[1] == "worker")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        ready = subprocess.run(
            [sys.executable, "-c", "import distributed, sys; c = distributed.Client(sys.argv[1], "
             "timeout=90); c.wait_for_workers(1, timeout=90); c.close()", address],
            capture_output=True, text=True, timeout=200)
        assert ready.returncode == 0, ready.stderr
        out = _run_block(code.replace(_DASK_ADDRESS, address), str(tmp_path))
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("[0, 1, 4, 9, 16")
    finally:
        for p in procs[::-1]:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def test_readme_runner_commands_run_as_printed(tmp_path):
    # the command files and script they name are the test's (placeholders); the commands are
    # the README's, run by the shell from this interpreter's bin directory
    [block] = [c for h, c in _blocks("sh") if h == "Running shell commands"]
    (tmp_path / "downloads.txt").write_text("# two downloads\necho a.csv\n\necho b.gz\n")
    (tmp_path / "export.txt").write_text("echo exported\n")
    script = tmp_path / "export.sh"
    script.write_text('#!/bin/sh\necho "$@"\n')
    script.chmod(0o755)
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable),
                                                 os.environ.get("PATH", "")]))
    outs = []
    for line in block.splitlines():
        cmd = line.split("  #")[0].strip()
        out = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, (cmd, out.stderr)
        outs.append(out.stdout)
    assert sorted(outs[0].split()) == ["[1]", "[2]", "a.csv", "b.gz"]
    assert [p.read_text() for p in (tmp_path / "logs").glob("*.out")] == ["exported\n"]
    assert len(outs[2].splitlines()) == 10 and "--from 9000 --count 1000" in outs[2]
