"""Helpers shared by test files (tests/ is on sys.path under pytest's default import mode)."""
import os

#: the suite runs against the AddressSanitizer build (make asan preloads its runtime): a
#: crash on purpose ends in ASan's report and SIGABRT instead of SIGSEGV
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


def memfd_count(prefix="/memfd:pyparallel"):
    """Open file descriptors of this process that are pyparallel memfds."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + fd).startswith(prefix):
                n += 1
        except OSError:
            pass
    return n
