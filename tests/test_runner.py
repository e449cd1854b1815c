"""The command runner: pyparallel.run_commands and ``python -m pyparallel run``.

Processes a test starts carry a marker in their environment (PP_RUNNER_MARK=<uuid>), which
every descendant inherits; the leak checks look for live processes with that marker."""
import io
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import pyparallel as pp
from pyparallel import runner


def marked_pids(mark):
    """Live (not zombie) processes whose environment holds PP_RUNNER_MARK=mark."""
    needle = f"PP_RUNNER_MARK={mark}".encode()
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        state = stat[stat.rfind(b")") + 2:].split()[0]
        if needle in env and state not in (b"Z", b"X"):
            pids.append(int(pid))
    return pids


def wait_for(pred, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.fixture
def mark(monkeypatch):
    m = uuid.uuid4().hex
    monkeypatch.setenv("PP_RUNNER_MARK", m)
    yield m
    assert wait_for(lambda: not marked_pids(m)), f"processes left: {marked_pids(m)}"


# ---- run_commands ----


def test_exit_codes_and_output_in_input_order(mark):
    cmds = ["sleep 0.3; echo first", "echo out; echo err >&2; exit 3", "printf 'no newline'",
            "kill -TERM $$"]
    rs = pp.run_commands(cmds, jobs=4)
    assert [r.index for r in rs] == [0, 1, 2, 3]
    assert [r.command for r in rs] == cmds
    assert [r.returncode for r in rs] == [0, 3, 0, -signal.SIGTERM]
    assert [r.stdout for r in rs] == ["first\n", "out\n", "no newline", ""]
    assert rs[1].stderr == "err\n" and rs[0].stderr == ""
    assert [r.ok for r in rs] == [True, False, True, False]
    assert not any(r.timed_out or r.killed for r in rs)
    assert rs[0].duration >= 0.3 and all(r.duration > 0 for r in rs)
    assert isinstance(rs[0], pp.CommandResult)


def test_missing_command_is_a_failed_result_with_the_shells_message(mark):
    (r,) = pp.run_commands(["pp_no_such_command_xyz --flag"])
    assert r.returncode == 127 and not r.ok
    assert "pp_no_such_command_xyz" in r.stderr and "not found" in r.stderr


def test_shell_features_and_no_stdin(mark):
    rs = pp.run_commands(["echo a | tr a b", "x=5; echo $((x * 2))", "cat"], jobs=2)
    assert [r.stdout for r in rs] == ["b\n", "10\n", ""]  # cat reads /dev/null, not ours


def test_more_commands_than_jobs_never_exceed_jobs(tmp_path, mark):
    # each command records the number of commands running while it runs
    d = tmp_path / "running"
    d.mkdir()
    cmd = (f"touch {d}/$$; ls {d} | wc -l >> {tmp_path}/counts; sleep 0.2; rm {d}/$$")
    rs = pp.run_commands([cmd] * 12, jobs=3)
    assert all(r.ok for r in rs) and len(rs) == 12
    counts = [int(x) for x in (tmp_path / "counts").read_text().split()]
    assert len(counts) == 12 and max(counts) <= 3 and max(counts) >= 2


def test_keep_going_runs_everything(mark):
    rs = pp.run_commands(["exit 1", "echo after", "exit 2", "echo end"], jobs=1)
    assert [r.returncode for r in rs] == [1, 0, 2, 0]
    assert rs[3].stdout == "end\n"


def test_fail_fast_starts_nothing_new_and_lets_running_finish(mark):
    cmds = ["sleep 0.5; echo finished", "sleep 0.1; exit 4", "echo never", "echo never"]
    rs = pp.run_commands(cmds, jobs=2, keep_going=False)
    assert [r.index for r in rs] == [0, 1]
    assert rs[0].ok and rs[0].stdout == "finished\n" and not rs[0].killed
    assert rs[1].returncode == 4


def test_fail_fast_kill_stops_running_commands(mark):
    cmds = ["sleep 600; echo no", "sleep 0.2; exit 1", "echo never"]
    t0 = time.monotonic()
    rs = pp.run_commands(cmds, jobs=2, keep_going=False, kill=True)
    assert time.monotonic() - t0 < 120  # hang guard: the sleep 600 was stopped
    assert [r.index for r in rs] == [0, 1]
    assert rs[0].killed and not rs[0].timed_out and not rs[0].ok
    assert rs[0].returncode == -signal.SIGTERM and rs[0].stdout == ""
    assert rs[1].returncode == 1 and not rs[1].killed


def test_timeout_stops_only_that_command(mark):
    rs = pp.run_commands(["sleep 600", "echo fast", "sleep 0.1; echo ok"], jobs=3, timeout=5)
    assert rs[0].timed_out and rs[0].returncode == -signal.SIGTERM and not rs[0].ok
    assert not rs[0].killed
    assert 5 <= rs[0].duration < 120    # hang guard: the sleep 600 was stopped
    assert [r.stdout for r in rs[1:]] == ["fast\n", "ok\n"] and all(r.ok for r in rs[1:])


def test_timeout_escalates_to_sigkill_for_a_group_ignoring_sigterm(mark, monkeypatch):
    monkeypatch.setattr(runner, "KILL_GRACE", 0.5)
    # the shell and its child (ignored signals are inherited) both ignore SIGTERM
    (r,) = pp.run_commands(["trap '' TERM; sleep 30; echo no"], timeout=0.3)
    assert r.timed_out and r.returncode == -signal.SIGKILL and r.stdout == ""


def test_child_surviving_the_shell_is_killed_at_timeout(mark, monkeypatch):
    monkeypatch.setattr(runner, "KILL_GRACE", 0.5)
    # a background child that ignores SIGTERM and does not hold the pipes
    (r,) = pp.run_commands(["(trap '' TERM; sleep 30) >/dev/null 2>&1 & sleep 30"],
                           timeout=0.3)
    assert r.timed_out
    # the mark fixture checks that the background sleep is gone too


def test_process_escaping_the_group_does_not_hang_the_run(mark, monkeypatch):
    monkeypatch.setattr(runner, "KILL_GRACE", 0.3)
    try:
        # setsid: a new session, out of the command's group, holding its stdout open
        (r,) = pp.run_commands(["setsid sleep 30 & sleep 30"], timeout=0.3)
        assert r.timed_out and r.returncode == -signal.SIGTERM
        assert r.stdout == "" and "kept its output open" in r.stderr
    finally:  # out of the runner's reach by design; the mark fixture checks the rest
        for pid in marked_pids(mark):
            os.kill(pid, signal.SIGKILL)


def test_output_dir_writes_per_command_logs(tmp_path, mark):
    cmds = [f"echo out{i}; echo err{i} >&2" for i in range(11)]
    out = tmp_path / "logs"
    rs = pp.run_commands(cmds, jobs=3, output_dir=out)
    assert all(r.ok and r.stdout is None and r.stderr is None for r in rs)
    names = sorted(os.listdir(out))
    assert names[:4] == ["01.err", "01.out", "02.err", "02.out"] and len(names) == 22
    assert (out / "11.out").read_text() == "out10\n"
    assert (out / "03.err").read_text() == "err2\n"
    assert runner.log_paths(str(out), 10, 11) == (str(out / "11.out"), str(out / "11.err"))


def test_on_result_sees_each_result_in_the_calling_thread(mark):
    import threading

    seen = []
    rs = pp.run_commands(["exit 1", "echo x"], jobs=2,
                         on_result=lambda r: seen.append((r.index, threading.get_ident())))
    assert sorted(i for i, _ in seen) == [0, 1]
    assert {t for _, t in seen} == {threading.get_ident()}
    assert len(rs) == 2


def test_exception_in_on_result_stops_everything(mark):
    def boom(r):
        raise RuntimeError("from callback")

    with pytest.raises(RuntimeError, match="from callback"):
        pp.run_commands(["exit 0", "sleep 30", "sleep 30", "echo late"], jobs=3, on_result=boom)
    # the mark fixture checks that both sleeps are gone


def test_empty_input():
    assert pp.run_commands([]) == []


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(cmds="echo hi"), TypeError, "not one string"),
    (dict(cmds=None), TypeError, "iterable"),
    (dict(cmds=["touch {flag}", 5]), TypeError, "command 1 is int"),
    (dict(cmds=["touch {flag}", "a\0b"]), ValueError, "NUL"),
    (dict(cmds=["touch {flag}"], jobs=0), ValueError, "at least 1"),
    (dict(cmds=["touch {flag}"], jobs=2.0), TypeError, "jobs must be an int"),
    (dict(cmds=["touch {flag}"], timeout=0), ValueError, "positive"),
    (dict(cmds=["touch {flag}"], timeout="1"), TypeError, "number of seconds"),
    (dict(cmds=["touch {flag}"], kill=True), ValueError, "keep_going=False"),
    (dict(cmds=["touch {flag}"], output_dir="{flag}.file"), NotADirectoryError, "output_dir"),
])
def test_bad_input_raises_before_anything_runs(tmp_path, kwargs, exc, msg):
    flag = tmp_path / "ran"
    (tmp_path / "ran.file").write_text("")
    kw = dict(kwargs)
    cmds = kw.pop("cmds")
    if isinstance(cmds, list):
        cmds = [c.format(flag=flag) if isinstance(c, str) else c for c in cmds]
    if "output_dir" in kw:
        kw["output_dir"] = kw["output_dir"].format(flag=flag)
    with pytest.raises(exc, match=msg):
        pp.run_commands(cmds, **kw)
    assert not flag.exists()


def test_parse_commands():
    text = "# header\n\necho a  \n   # indented comment\n  echo b # shell comment\n\t\n"
    assert runner.parse_commands(text) == ["echo a", "  echo b # shell comment"]


# line breaks to str.splitlines that are no line end to the shell (issue 26)
ODD_BREAKS = ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r"]


def test_parse_commands_ends_lines_at_newlines_only():
    cmds = [f"printf '%s' 'a{c}b'" for c in ODD_BREAKS]
    assert runner.parse_commands("\n".join(cmds) + "\n") == cmds
    assert runner.parse_commands("\r\n".join(cmds) + "\r\n") == cmds


def test_cli_file_with_line_breaks_inside_quotes_runs_each_line_once(tmp_path, mark):
    # each command prints its argument's bytes in hex: they reached the shell whole
    cmds = [f"printf '%s' 'a{c}b' | od -An -tx1" for c in ODD_BREAKS]
    f = tmp_path / "cmds.txt"
    f.write_bytes("\n".join(cmds).encode() + b"\r\n")
    p = subprocess.run([sys.executable, "-m", "pyparallel", "run", "-j", "2", str(f)],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONUTF8="1"))
    assert p.returncode == 0, p.stderr
    assert f"{len(cmds)} ok, 0 failed" in p.stderr
    got = sorted(line.split() for line in p.stdout.splitlines())
    want = sorted([f"[{i + 1}]", *(f"{b:02x}" for b in f"a{c}b".encode())]
                  for i, c in enumerate(ODD_BREAKS))
    assert got == want


def test_plain_progress_counts_failures():
    buf = io.StringIO()
    p = runner._PlainProgress(3, buf)
    p.update(False)
    p.update(True)
    p.update(False)
    p.close()
    assert buf.getvalue().split("\r")[-1] == "3/3 done, 1 failed\n"


def test_summary_counts_and_slowest():
    R = pp.CommandResult
    rs = [R(i, f"cmd{i}", 0, "", "", float(i)) for i in range(7)]
    rs.append(R(7, "bad", 2, "", "", 0.5))
    rs.append(R(8, "slow", -15, "", "", 0.1, timed_out=True))
    text = runner.summary(rs, 10, 7.0, 4)
    assert "10 commands on 4 jobs" in text
    assert "7 ok, 1 failed, 1 timed out, 1 not started" in text
    slowest = text.split("slowest:\n")[1].splitlines()
    assert len(slowest) == 5 and "[7] cmd6" in slowest[0] and "[3] cmd2" in slowest[4]
    assert "[8] exit 2" in text and "[9] timed out" in text


# ---- python -m pyparallel run ----


def cli(args, input=None, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "pyparallel", "run", *args], input=input,
                          capture_output=True, text=True, timeout=timeout, **kw)


def test_cli_file_prefixed_output_and_exit_status(tmp_path, mark):
    f = tmp_path / "cmds.txt"
    f.write_text("# comment\necho one\n\necho two; echo warn >&2\n  # another\nexit 5\n")
    p = cli(["-j", "2", str(f)])
    assert p.returncode == 1
    assert sorted(p.stdout.splitlines()) == ["[1] one", "[2] two"]
    assert "[2] warn" in p.stderr
    assert "3 commands on 2 jobs" in p.stderr and "2 ok, 1 failed, 0 timed out" in p.stderr
    assert "[3] exit 5" in p.stderr and "slowest:" in p.stderr


def test_cli_stdin_all_ok_exits_0(mark):
    for args in ([], ["-"]):
        p = cli(["-j", "3", *args], input="echo a\necho b\necho c\n")
        assert p.returncode == 0, p.stderr
        assert sorted(p.stdout.splitlines()) == ["[1] a", "[2] b", "[3] c"]
        assert "3 ok, 0 failed" in p.stderr


def test_cli_missing_command_and_timeout(mark):
    p = cli(["--timeout", "3"], input="pp_no_such_command_xyz\nsleep 600\necho fine\n")
    assert p.returncode == 1
    assert "[1] " in p.stderr and "pp_no_such_command_xyz" in p.stderr
    assert "1 ok, 1 failed, 1 timed out" in p.stderr
    assert "[2] timed out" in p.stderr and "[1] exit 127" in p.stderr


def test_cli_fail_fast_and_kill(mark):
    # the failure comes first, by a margin that holds on a busy machine
    cmds = "sleep 3; echo done\nsleep 0.1; exit 3\necho never\n"
    p = cli(["-j", "2", "--fail-fast"], input=cmds)
    assert p.returncode == 1
    assert p.stdout.splitlines() == ["[1] done"]
    assert "1 not started" in p.stderr
    p = cli(["-j", "2", "--fail-fast", "--kill"], input=cmds.replace("sleep 3", "sleep 600"))
    assert p.returncode == 1 and p.stdout == ""
    assert "1 killed" in p.stderr and "[1] killed" in p.stderr


def test_cli_output_dir(tmp_path, mark):
    p = cli(["--output-dir", str(tmp_path / "out")], input="echo a\necho b >&2; exit 1\n")
    assert p.returncode == 1 and p.stdout == ""
    assert (tmp_path / "out" / "1.out").read_text() == "a\n"
    assert (tmp_path / "out" / "2.err").read_text() == "b\n"
    assert "1 ok, 1 failed" in p.stderr


def test_cli_tqdm_progress_counts_failures(mark):
    pytest.importorskip("tqdm")
    p = cli(["--progress", "-j", "2"], input="echo a\nexit 1\necho c\n")
    assert p.returncode == 1
    assert "3/3" in p.stderr and "failed=1" in p.stderr


def test_cli_closed_stdout_stops_commands_quietly(tmp_path):
    mark = uuid.uuid4().hex
    f = tmp_path / "cmds.txt"
    f.write_text("sleep 30\nseq 1 100000\nseq 1 100000\n")
    proc = subprocess.Popen([sys.executable, "-m", "pyparallel", "run", "-j", "2", str(f)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PP_RUNNER_MARK=mark))
    try:
        assert proc.stdout.readline() == "[2] 1\n"
        proc.stdout.close()  # as `| head -1` does
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 1
        assert "standard output closed" in err and "Traceback" not in err
        assert wait_for(lambda: not marked_pids(mark)), marked_pids(mark)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("args, msg", [
    (["--kill"], "--kill needs --fail-fast"),
    (["-j", "0"], "at least 1"),
    (["--timeout", "-1"], "positive"),
    (["--fail-fast", "--keep-going"], "not allowed with"),
    (["/nonexistent/pp_cmds.txt"], "cannot read"),
])
def test_cli_bad_arguments_exit_2_before_running(tmp_path, args, msg):
    flag = tmp_path / "ran"
    p = cli(args, input=f"touch {flag}\n")
    assert p.returncode == 2 and msg in p.stderr
    assert not flag.exists()


def test_demo_subcommand_still_parses():
    p = subprocess.run([sys.executable, "-m", "pyparallel", "demo", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--workers" in p.stdout


def _start_cli(mark, cmds, tmp_path, **kw):
    f = tmp_path / "cmds.txt"
    f.write_text(cmds)
    env = dict(os.environ, PP_RUNNER_MARK=mark)
    return subprocess.Popen([sys.executable, "-m", "pyparallel", "run", "-j", "3", str(f)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.mark.parametrize("to", ["process", "group"])
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                       (signal.SIGHUP, 129)])
def test_cli_interrupt_kills_every_group_and_exits(sig, code, to, tmp_path):
    mark = uuid.uuid4().hex
    cmds = "sleep 30\nsleep 30 && echo no\ntrap '' TERM; sleep 30\nsleep 30\nsleep 30\n"
    # "group": the CLI leads a process group of its own, which gets the signal (a hangup)
    proc = _start_cli(mark, cmds, tmp_path, start_new_session=(to == "group"))
    try:
        # three commands running: each a shell or its sleep, all under the runner
        assert wait_for(lambda: sum(1 for p in marked_pids(mark) if p != proc.pid
                                    and _comm(p) == "sleep") == 3), marked_pids(mark)
        if to == "group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        assert "every running command was stopped" in err and out == ""
        assert wait_for(lambda: not marked_pids(mark)), marked_pids(mark)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in marked_pids(mark):
            os.kill(pid, signal.SIGKILL)


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


@pytest.mark.parametrize("how", ["process", "thread"])
def test_api_keyboard_interrupt_stops_commands_and_propagates(mark, how):
    import threading

    # "thread": raise() in the timer thread delivers the signal to that thread, not to the
    # main one waiting for results
    send = (lambda: os.kill(os.getpid(), signal.SIGINT)) if how == "process" else \
        (lambda: signal.raise_signal(signal.SIGINT))
    timer = threading.Timer(0.5, send)
    timer.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            pp.run_commands(["sleep 600", "sleep 600", "sleep 600"], jobs=2)
        assert time.monotonic() - t0 < 120  # hang guard: interrupted, not run to the end
    finally:
        timer.cancel()
