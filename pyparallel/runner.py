"""Run a list of shell commands on N worker threads: ``run_commands`` and the CLI behind
``python -m pyparallel run``.

Each command runs through the shell (``/bin/sh -c``, as ``subprocess.run(cmd, shell=True)``)
in a session and process group of its own (``start_new_session=True``), with standard input
from /dev/null. Its own group is what lets a timeout, ``--fail-fast --kill`` or Ctrl-C stop
the whole command (the shell and everything it started) and nothing else; and because the
children are not in the terminal's foreground group, a Ctrl-C reaches only the runner, which
then stops them itself: SIGTERM to each group, SIGKILL ``KILL_GRACE`` seconds later to any
group still there.

Results follow ``subprocess`` conventions: ``returncode`` is the exit status, or ``-N`` for a
command ended by signal N; a command the shell cannot find is a failed result with exit
status 127 and the shell's message in ``stderr``, not an exception.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable

__all__ = ["CommandResult", "run_commands", "parse_commands", "main"]

#: Seconds between SIGTERM and SIGKILL to a command's process group when it is stopped
#: (timeout, kill, Ctrl-C), and again before its output pipes are given up on when a
#: process that left the group still holds them open.
KILL_GRACE = 2.0
_TICK = 0.05  # how often a waiting thread looks at its deadline and the stop flag


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """The outcome of one command of :func:`run_commands`.

    ``index``: its position in the input (0-based); ``returncode``: the exit status, ``-N``
    when a signal N ended it; ``stdout``/``stderr``: its output as text (undecodable bytes
    replaced), or None when it went to files (``output_dir``); ``duration``: seconds from
    start to end; ``timed_out``: it ran past ``timeout`` and was stopped; ``killed``: it was
    stopped because another command failed (``kill=True``) or the run was interrupted.
    """

    index: int
    command: str
    returncode: int
    stdout: str | None
    stderr: str | None
    duration: float
    timed_out: bool = False
    killed: bool = False

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0 on its own."""
        return self.returncode == 0 and not self.timed_out and not self.killed


def parse_commands(text: str) -> list[str]:
    """The commands of a command file: one per line, blank lines and lines whose first
    non-blank character is ``#`` skipped (a ``#`` later in a line is left to the shell).

    Lines end at a newline (``\\n``, or ``\\r\\n``) only, as the shell reads them: a form
    feed, a lone carriage return, U+2028 or a control character such as ``\\x1c`` (all line
    breaks to ``str.splitlines``) is part of the command, inside quotes or not."""
    cmds = []
    for line in text.split("\n"):
        s = line.strip()
        if s and not s.startswith("#"):
            cmds.append(line.rstrip(" \t\r"))
    return cmds


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # a process of the group changed its user: nothing we may do
        pass


def _group_exists(pgid: int) -> bool:
    """Whether a live (not zombie) process is in group ``pgid``. Zombies count for
    killpg(pgid, 0), and a dead command's orphans stay zombies wherever the init process
    does not reap (some containers), so the members are read from /proc."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) "
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


class _Job:
    """One running command: its process, and the stop protocol (SIGTERM, then SIGKILL after
    KILL_GRACE) driven by its own thread, from a timeout or from ``stop()`` by the caller."""

    def __init__(self, index: int, command: str, proc: subprocess.Popen, timeout: float | None,
                 started: float):
        self.index, self.command, self.proc = index, command, proc
        self.started = started
        self.deadline = None if timeout is None else started + timeout
        self.lock = threading.Lock()
        self.finished = False  # the process was reaped: its group id may be reused
        self.term_at: float | None = None
        self.kill_at: float | None = None
        self.timed_out = False
        self.killed = False

    def stop(self, force: bool = False) -> None:
        """Stop this command (from another thread): SIGTERM now, SIGKILL when ``force`` or
        KILL_GRACE later (by the job's thread)."""
        with self.lock:
            if self.finished:
                return
            self.killed = True
            now = time.monotonic()
            if self.term_at is None:
                self.term_at = now
                _signal_group(self.proc.pid, signal.SIGTERM)
            if force and self.kill_at is None:
                self.kill_at = now
                _signal_group(self.proc.pid, signal.SIGKILL)

    def _escalate(self, now: float) -> bool:
        """Move the stop protocol on; True when the pipes should be given up on."""
        with self.lock:
            if self.term_at is None:
                if self.deadline is not None and now >= self.deadline:
                    self.timed_out = True
                    self.term_at = now
                    _signal_group(self.proc.pid, signal.SIGTERM)
            elif self.kill_at is None:
                if now >= self.term_at + KILL_GRACE:
                    self.kill_at = now
                    _signal_group(self.proc.pid, signal.SIGKILL)
            elif now >= self.kill_at + KILL_GRACE:
                return True
        return False

    def wait(self) -> tuple[str | None, str | None]:
        proc = self.proc
        while True:
            try:
                out, err = proc.communicate(timeout=_TICK)
                break
            except subprocess.TimeoutExpired:
                pass
            if self._escalate(time.monotonic()):
                # A process that left the group (setsid) holds the pipes open: give up on
                # them rather than wait forever; the shell itself is dead by now.
                for f in (proc.stdout, proc.stderr):
                    if f is not None:
                        f.close()
                proc.wait()
                out = "" if proc.stdout is not None else None
                err = None
                if proc.stderr is not None:
                    err = ("pyparallel: output discarded: a process outside the command's "
                           "process group kept its output open\n")
                break
        # The shell is reaped. If it was being stopped, members of its group that outlived
        # it (ignoring SIGTERM) get SIGKILL at the end of the grace period.
        with self.lock:
            term_at, kill_at = self.term_at, self.kill_at
        if term_at is not None and kill_at is None:
            while _group_exists(proc.pid):
                if time.monotonic() >= term_at + KILL_GRACE:
                    _signal_group(proc.pid, signal.SIGKILL)
                    break
                time.sleep(_TICK)
        with self.lock:
            self.finished = True
        return out, err


def _check_args(cmds, jobs, timeout, keep_going, kill, output_dir):
    if isinstance(cmds, (str, bytes)):
        raise TypeError("run_commands() takes a list of command strings, not one string")
    try:
        cmds = list(cmds)
    except TypeError:
        raise TypeError(f"run_commands() takes an iterable of strings, not "
                        f"{type(cmds).__name__}") from None
    for i, c in enumerate(cmds):
        if not isinstance(c, str):
            raise TypeError(f"command {i} is {type(c).__name__}, not str")
        if "\0" in c:
            raise ValueError(f"command {i} contains a NUL character")
    if jobs is None:
        from ._cpu import cpu_count

        jobs = cpu_count()
    if isinstance(jobs, bool) or not isinstance(jobs, int):
        raise TypeError(f"jobs must be an int, not {type(jobs).__name__}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds or None, not "
                            f"{type(timeout).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
    if kill and keep_going:
        raise ValueError("kill=True stops running commands after a failure: it needs "
                         "keep_going=False")
    if output_dir is not None:
        output_dir = os.fspath(output_dir)
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise NotADirectoryError(errno.ENOTDIR, "output_dir is not a directory", output_dir)
    return cmds, jobs, timeout, output_dir


def log_paths(output_dir: str, index: int, total: int) -> tuple[str, str]:
    """The (stdout, stderr) log files of command ``index`` (0-based) of ``total`` under
    ``output_dir``: ``0003.out`` and ``0003.err`` for the third, numbered from 1, zero-padded
    to the width of ``total``."""
    name = str(index + 1).zfill(len(str(total)))
    return os.path.join(output_dir, name + ".out"), os.path.join(output_dir, name + ".err")


def run_commands(cmds: Iterable[str], jobs: int | None = None, timeout: float | None = None,
                 keep_going: bool = True, *, kill: bool = False, output_dir=None,
                 on_result: Callable[[CommandResult], None] | None = None) -> list[CommandResult]:
    """run_commands(cmds, jobs=None, timeout=None, keep_going=True, *, kill=False,
    output_dir=None, on_result=None) -> list[CommandResult]

    Run each shell command of ``cmds`` (strings), at most ``jobs`` at a time (default:
    :func:`pyparallel.cpu_count`), each through ``/bin/sh -c`` in a process group of its own,
    and return their results in input order.

    - ``timeout``: seconds a command may run; past it its group gets SIGTERM, then SIGKILL
      2 s later, and its result has ``timed_out=True``.
    - ``keep_going=False``: after the first failed command (non-zero status or timeout) no
      new command starts; running ones finish, or with ``kill=True`` are stopped like a
      timed-out one (``killed=True``). The result list then holds the commands that ran.
    - ``output_dir``: each command's stdout and stderr go to ``DIR/N.out`` and ``DIR/N.err``
      (N numbered from 1, see :func:`log_paths`) instead of memory; the results' ``stdout``
      and ``stderr`` are then None.
    - ``on_result(result)`` is called in the calling thread as each command finishes.

    On KeyboardInterrupt (or any exception from ``on_result``) every running command is
    stopped, no new one starts, and the exception propagates once they are all gone.
    """
    cmds, jobs, timeout, output_dir = _check_args(cmds, jobs, timeout, keep_going, kill,
                                                  output_dir)
    total = len(cmds)
    if total == 0:
        return []
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)

    lock = threading.Lock()
    state = {"next": 0, "stop": False}
    running: dict[int, _Job] = {}
    done: queue.SimpleQueue = queue.SimpleQueue()  # CommandResult, or ("exit",) / ("error", e)

    def start(index: int) -> _Job | None:
        cmd = cmds[index]
        files = []
        try:
            if output_dir is not None:
                out_path, err_path = log_paths(output_dir, index, total)
                files = [open(out_path, "wb"), open(err_path, "wb")]
                stdout, stderr = files
            else:
                stdout = stderr = subprocess.PIPE
            started = time.monotonic()
            proc = subprocess.Popen(cmd, shell=True, start_new_session=True,
                                    stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                    text=True, errors="replace")
        finally:
            for f in files:
                f.close()
        job = _Job(index, cmd, proc, timeout, started)
        with lock:
            running[index] = job
            stopping = state["stop"]
        if stopping:  # the run was stopped while this one was being started
            job.stop()
        return job

    def worker() -> None:
        try:
            while True:
                with lock:
                    if state["stop"] or state["next"] >= total:
                        return
                    index = state["next"]
                    state["next"] += 1
                job = start(index)
                out, err = job.wait()
                rc = job.proc.returncode
                result = CommandResult(index, job.command, rc, out, err,
                                       time.monotonic() - job.started, job.timed_out,
                                       job.killed and not job.timed_out)
                with lock:
                    del running[index]
                if not result.ok and not keep_going:
                    # here, not in the caller's thread: this thread must not take the
                    # next command before the stop is decided
                    if kill:
                        stop_all()
                    else:
                        stop_starting()
                done.put(result)
        except BaseException as e:  # e.g. Popen failing for want of processes or fds
            done.put(("error", e))
        finally:
            done.put(("exit",))

    def stop_starting() -> None:
        with lock:
            state["stop"] = True

    def stop_all(force: bool = False) -> None:
        with lock:
            state["stop"] = True
            jobs_now = list(running.values())
        for job in jobs_now:
            job.stop(force)

    results: list[CommandResult] = []
    threads = [threading.Thread(target=worker, name=f"pyparallel-run-{i}", daemon=True)
               for i in range(min(jobs, total))]
    alive = 0
    error: BaseException | None = None
    try:
        for t in threads:
            t.start()
            alive += 1
        while alive:
            try:
                # a bounded wait: a signal caught by another thread (raise() there) is
                # only acted on once this thread runs Python code again
                item = done.get(timeout=0.25)
            except queue.Empty:
                continue
            if isinstance(item, CommandResult):
                results.append(item)
                if on_result is not None:
                    on_result(item)
            elif item[0] == "exit":
                alive -= 1
            elif error is None:
                error = item[1]
                stop_all()
    except BaseException:
        stop_all()
        _drain(done, alive, stop_all)
        raise
    if error is not None:
        raise error
    results.sort(key=lambda r: r.index)
    return results


def _drain(done, alive, stop_all) -> None:
    """Wait for the worker threads after stop_all(); a second Ctrl-C sends SIGKILL at once.
    Gives up after a bound: a thread can only be stuck if a process escaped its group."""
    deadline = time.monotonic() + 3 * KILL_GRACE + 1
    while alive and time.monotonic() < deadline:
        try:
            item = done.get(timeout=_TICK)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            stop_all(force=True)
            continue
        if not isinstance(item, CommandResult) and item[0] == "exit":
            alive -= 1


# ---- the command line: python -m pyparallel run ----


class _PlainProgress:
    """A one-line counter on a stream (stderr), for when tqdm is not installed."""

    def __init__(self, total: int, stream):
        self.total, self.stream = total, stream
        self.done = self.failed = 0
        self.tty = stream.isatty() if hasattr(stream, "isatty") else False
        self._draw()

    def _draw(self) -> None:
        self.stream.write(f"\r{self.done}/{self.total} done, {self.failed} failed")
        self.stream.flush()

    def update(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        self._draw()

    def write(self, stream, text: str) -> None:
        if self.tty:  # clear the counter line so that the text does not run into it
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        stream.write(text)
        stream.flush()
        if self.tty:
            self._draw()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class _TqdmProgress:
    def __init__(self, total: int, stream, tqdm):
        self.bar = tqdm(total=total, unit="cmd", file=stream, dynamic_ncols=True)
        self.bar.set_postfix(failed=0)
        self.failed = 0

    def update(self, failed: bool) -> None:
        if failed:
            self.failed += 1
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

    def write(self, stream, text: str) -> None:
        with self.bar.external_write_mode(file=stream):
            stream.write(text)
            stream.flush()

    def close(self) -> None:
        self.bar.close()


class _NoProgress:
    def update(self, failed: bool) -> None:
        pass

    def write(self, stream, text: str) -> None:
        stream.write(text)
        stream.flush()

    def close(self) -> None:
        pass


def _make_progress(total: int, enabled: bool, stream):
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, stream)
    return _TqdmProgress(total, stream, tqdm)


def _prefixed(tag: str, text: str) -> str:
    if not text:
        return ""
    lines = text.split("\n")  # lines as parse_commands reads them
    if lines[-1] == "":
        lines.pop()
    return "".join(f"{tag} {line.removesuffix(chr(13))}\n" for line in lines)


def _status(r: CommandResult) -> str:
    if r.timed_out:
        return "timed out"
    if r.killed:
        return "killed"
    if r.returncode < 0:
        try:
            return f"signal {signal.Signals(-r.returncode).name}"
        except ValueError:
            return f"signal {-r.returncode}"
    return f"exit {r.returncode}"


def _short(cmd: str, width: int = 60) -> str:
    cmd = " ".join(cmd.split())
    return cmd if len(cmd) <= width else cmd[:width - 3] + "..."


def summary(results: list[CommandResult], total: int, elapsed: float, jobs: int) -> str:
    """The text the CLI prints at the end: counts, the failures, the 5 slowest commands."""
    ok = sum(r.ok for r in results)
    timed_out = sum(r.timed_out for r in results)
    killed = sum(r.killed for r in results)
    failed = len(results) - ok - timed_out - killed
    parts = [f"{ok} ok", f"{failed} failed", f"{timed_out} timed out"]
    if killed:
        parts.append(f"{killed} killed")
    if total > len(results):
        parts.append(f"{total - len(results)} not started")
    lines = [f"pyparallel run: {total} command{'s' * (total != 1)} on {jobs} job"
             f"{'s' * (jobs != 1)} in {elapsed:.2f} s: {', '.join(parts)}"]
    bad = [r for r in results if not r.ok]
    if bad:
        lines.append("not ok:")
        for r in bad[:10]:
            lines.append(f"  [{r.index + 1}] {_status(r):<12} {_short(r.command)}")
        if len(bad) > 10:
            lines.append(f"  ... and {len(bad) - 10} more")
    if results:
        lines.append("slowest:")
        for r in sorted(results, key=lambda r: -r.duration)[:5]:
            lines.append(f"  {r.duration:9.3f} s  [{r.index + 1}] {_short(r.command)}")
    return "\n".join(lines) + "\n"


class _Terminated(BaseException):
    """SIGTERM or SIGHUP (``args[0]``) reached the CLI."""


def _on_stop_signal(signum, frame):
    raise _Terminated(signum)


#: Signals that stop the CLI and its commands (as Ctrl-C does), with what it reports. The
#: commands run in sessions of their own, so a hangup of the terminal or a signal to the
#: CLI's process group reaches only the CLI, which must pass it on. An ignored SIGHUP (nohup)
#: stays ignored.
_STOP_SIGNALS = {signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}


def add_arguments(parser) -> None:
    """The options of ``python -m pyparallel run``."""
    parser.add_argument("file", nargs="?", default="-", metavar="FILE",
                        help="commands, one per line; '#' comments and blank lines skipped "
                             "(default, or '-': standard input)")
    parser.add_argument("-j", "--jobs", type=int, default=None,
                        help="commands run at a time (default: cpu_count())")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a command that runs longer (SIGTERM, SIGKILL 2 s later)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--keep-going", dest="keep_going", action="store_true", default=True,
                      help="run every command whatever fails (the default)")
    mode.add_argument("--fail-fast", dest="keep_going", action="store_false",
                      help="after a failure start no new command; running ones finish")
    parser.add_argument("--kill", action="store_true",
                        help="with --fail-fast: also stop the running commands")
    parser.add_argument("--output-dir", metavar="DIR", default=None,
                        help="write command N's output to DIR/N.out and DIR/N.err instead "
                             "of stdout/stderr prefixed with [N]")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar on stderr, with tqdm when installed (default: "
                             "when stderr is a terminal)")


def main(args, parser) -> int:
    """Run ``python -m pyparallel run`` with parsed ``args``; returns the exit status:
    0 when every command succeeded, 1 when any failed, timed out or was not started,
    130 after Ctrl-C (143 after SIGTERM, 129 after SIGHUP), with every command stopped."""
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"-j/--jobs must be at least 1, not {args.jobs}")
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout must be positive, not {args.timeout}")
    if args.kill and args.keep_going:
        parser.error("--kill needs --fail-fast")
    if args.output_dir is not None and os.path.exists(args.output_dir) \
            and not os.path.isdir(args.output_dir):
        parser.error(f"--output-dir {args.output_dir}: not a directory")
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, newline="") as f:  # "\r" is no line end: see parse_commands
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"cannot read {args.file}: {e}")
    cmds = parse_commands(text)
    if "\0" in text:
        parser.error(f"{args.file}: contains a NUL character")
    from ._cpu import cpu_count

    jobs = args.jobs or cpu_count()
    out, err = sys.stdout, sys.stderr
    show = err.isatty() if args.progress is None else args.progress
    progress = _make_progress(len(cmds), show and bool(cmds), err)

    def on_result(r: CommandResult) -> None:
        progress.update(not r.ok)
        if args.output_dir is None:
            tag = f"[{r.index + 1}]"
            if r.stdout:
                progress.write(out, _prefixed(tag, r.stdout))
            if r.stderr:
                progress.write(err, _prefixed(tag, r.stderr))

    in_main = threading.current_thread() is threading.main_thread()
    old_handlers = {}
    if in_main:
        for sig in _STOP_SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
                continue
            old_handlers[sig] = signal.signal(sig, _on_stop_signal)
    t0 = time.monotonic()
    try:
        results = run_commands(cmds, jobs=jobs, timeout=args.timeout,
                               keep_going=args.keep_going, kill=args.kill,
                               output_dir=args.output_dir, on_result=on_result)
    except KeyboardInterrupt:
        progress.close()
        err.write("pyparallel run: interrupted; every running command was stopped\n")
        return 130
    except BrokenPipeError:  # our stdout was closed (| head): stop, quietly
        progress.close()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())  # so that the flush at exit does not fail again
        os.close(devnull)
        err.write("pyparallel run: standard output closed; every running command was "
                  "stopped\n")
        return 1
    except _Terminated as e:
        progress.close()
        sig = e.args[0]
        err.write(f"pyparallel run: {_STOP_SIGNALS[sig]}; every running command was stopped\n")
        return 128 + sig
    finally:
        for sig, old in old_handlers.items():
            signal.signal(sig, old)
    progress.close()
    err.write(summary(results, len(cmds), time.monotonic() - t0, min(jobs, len(cmds)) or jobs))
    err.flush()
    return 0 if len(results) == len(cmds) and all(r.ok for r in results) else 1
