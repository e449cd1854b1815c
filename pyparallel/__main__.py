"""Command line: ``python -m pyparallel demo``."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pyparallel")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the teaching examples side by side, timed")
    demo.add_argument("--workers", type=int, default=None, help="threads/processes (default: cpu_count())")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(workers=args.workers)
    return 2


if __name__ == "__main__":
    sys.exit(main())
