"""Command line: ``python -m pyparallel demo`` and ``python -m pyparallel run``."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pyparallel")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the teaching examples side by side, timed")
    demo.add_argument("--workers", type=int, default=None, help="threads/processes (default: cpu_count())")
    from . import runner

    run = sub.add_parser("run", help="run shell commands, N at a time",
                         description="Run shell commands from FILE (one per line), N at a time, "
                                     "each in its own process group.")
    runner.add_arguments(run)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(workers=args.workers)
    if args.command == "run":
        return runner.main(args, run)
    return 2


if __name__ == "__main__":
    sys.exit(main())
