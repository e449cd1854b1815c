"""Run CPython's own multiprocessing tests (Lib/test/_test_multiprocessing.py, from the
interpreter's ``test`` package) against pyparallel: the "processes" flavour of the chosen
groups, with the test classes' ``Pool``, ``Queue``, ``JoinableQueue`` and ``Pipe`` replaced by
pyparallel's (``Process`` stays multiprocessing's, as a program that switches only those
would have it).

    python tests/run_cpython_mp.py [--start-method fork|forkserver|spawn] [GROUP ...] [-k PAT]

GROUPs: Pool (_TestPool, _TestPoolWorkerErrors, _TestPoolWorkerLifetime), QUEUE (_TestQueue),
CONNECTION (_TestConnection, _TestListener, _TestListenerClient, _TestPoll,
_TestPicklingConnections); default: all three. Prints each
group's counts and exits non-zero if anything failed. Needs the interpreter's ``test``
package (pyenv and python.org builds have it; Debian's is python3-test).
"""
import argparse
import importlib
import os
import sys
import unittest

GROUPS = {
    "Pool": ["_TestPool", "_TestPoolWorkerErrors", "_TestPoolWorkerLifetime"],
    "QUEUE": ["_TestQueue"],
    "CONNECTION": ["_TestConnection", "_TestListener", "_TestListenerClient", "_TestPoll",
                   "_TestPicklingConnections"],
}


def _install():
    """Make the WithProcesses* classes of every group in this module, with pyparallel's
    names on the mixin. At import, so that a worker that unpickles one of their methods by
    reference (forkserver, spawn) imports this module and gets the same classes."""
    import pyparallel as pp
    from test import _test_multiprocessing as tmp

    mixin = tmp.ProcessesMixin
    mixin.Pool = staticmethod(pp.Pool)
    mixin.Queue = staticmethod(pp.Queue)
    mixin.JoinableQueue = staticmethod(pp.JoinableQueue)
    mixin.Pipe = staticmethod(pp.Pipe)
    classes = {}
    for group, names in GROUPS.items():
        classes[group] = []
        for name in names:
            base = getattr(tmp, name)
            cls = type("WithProcesses" + name[1:], (base, mixin, unittest.TestCase), {})
            cls.__module__ = __name__
            globals()[cls.__name__] = cls
            classes[group].append(cls)
    return classes


if __name__ != "__main__":
    CLASSES = _install()


def load(start_method, groups, pattern=None):
    import multiprocessing

    from test import _test_multiprocessing as tmp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    mod = importlib.import_module("run_cpython_mp")   # this file, as an importable module
    multiprocessing.set_forkserver_preload(tmp.PRELOAD)
    multiprocessing.set_start_method(start_method, force=True)
    loader = unittest.TestLoader()
    if pattern:
        loader.testNamePatterns = [f"*{pattern}*"]
    suites = {}
    for group in groups:
        suites[group] = unittest.TestSuite(loader.loadTestsFromTestCase(cls)
                                           for cls in mod.CLASSES[group])
    return suites


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("groups", nargs="*", choices=[[]] + list(GROUPS), default=[])
    ap.add_argument("--start-method", default="fork")
    ap.add_argument("-k", dest="pattern")
    ap.add_argument("-v", action="store_true")
    args = ap.parse_args(argv)
    groups = args.groups or list(GROUPS)
    counts, ok = {}, True
    for group, suite in load(args.start_method, groups, args.pattern).items():
        res = unittest.TextTestRunner(verbosity=2 if args.v else 1, stream=sys.stderr).run(suite)
        bad = len(res.failures) + len(res.errors)
        counts[group] = (res.testsRun - bad - len(res.skipped), bad, len(res.skipped))
        ok = ok and res.wasSuccessful()
    for group, (passed, bad, skipped) in counts.items():
        print(f"{group} ({args.start_method}): {passed} passed, {bad} failed, {skipped} skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
