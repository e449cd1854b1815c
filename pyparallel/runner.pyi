# Type stubs for pyparallel.runner: run_commands and ``python -m pyparallel run``.
import argparse
import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["CommandResult", "run_commands", "parse_commands", "main"]

KILL_GRACE: float

@dataclasses.dataclass(frozen=True)
class CommandResult:
    index: int
    command: str
    returncode: int
    stdout: str | None
    stderr: str | None
    duration: float
    timed_out: bool = False
    killed: bool = False
    @property
    def ok(self) -> bool: ...

def parse_commands(text: str) -> list[str]: ...
def log_paths(output_dir: str, index: int, total: int) -> tuple[str, str]: ...
def run_commands(cmds: Iterable[str], jobs: int | None = None, timeout: float | None = None,
                 keep_going: bool = True, *, kill: bool = False,
                 output_dir: str | os.PathLike[str] | None = None,
                 on_result: Callable[[CommandResult], None] | None = None
                 ) -> list[CommandResult]: ...
def add_arguments(parser: argparse.ArgumentParser) -> None: ...
def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int: ...
