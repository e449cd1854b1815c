"""How many CPUs this process may use: affinity and cgroup (v1 and v2) CPU quotas.

``os.cpu_count()`` counts the machine's CPUs; a process pinned to two of them, or a
container limited to 1.5 CPUs, gets far less. Oversubscribing such a quota makes parallel
code slower, not faster, so every default thread and process count in pyparallel comes
from :func:`cpu_count`.
"""
from __future__ import annotations

import math
import os
import time

__all__ = ["cpu_count", "default_threads"]


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _quota_cpus(quota: float, period: float) -> float | None:
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _cgroup_v2_limit(root: str, rel: str) -> float | None:
    """Smallest cpu.max quota from the process's cgroup up to the hierarchy's root."""
    best = None
    path = rel.strip("/")
    while True:
        text = _read(os.path.join(root, "sys/fs/cgroup", path, "cpu.max"))
        if text:
            fields = text.split()
            if fields and fields[0] != "max":
                period = float(fields[1]) if len(fields) > 1 else 100000.0
                cpus = _quota_cpus(float(fields[0]), period)
                if cpus is not None and (best is None or cpus < best):
                    best = cpus
        if not path:
            return best
        path = os.path.dirname(path)


def _cgroup_v1_mount(root: str) -> str | None:
    """Where the v1 hierarchy holding the cpu controller is mounted."""
    text = _read(os.path.join(root, "proc/self/mountinfo"))
    for line in (text or "").splitlines():
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) >= 5 and len(rparts) >= 3 and rparts[0] == "cgroup":
            if "cpu" in rparts[2].split(","):
                return parts[4]
    return None


def _cgroup_v1_limit(root: str, rel: str) -> float | None:
    mount = _cgroup_v1_mount(root) or "/sys/fs/cgroup/cpu"
    best = None
    path = rel.strip("/")
    # Inside a cgroup namespace the path may not exist under the mount: fall back to parents.
    while True:
        base = os.path.join(root, mount.lstrip("/"), path)
        quota = _read(os.path.join(base, "cpu.cfs_quota_us"))
        period = _read(os.path.join(base, "cpu.cfs_period_us"))
        if quota and period:
            cpus = _quota_cpus(float(quota), float(period))
            if cpus is not None and (best is None or cpus < best):
                best = cpus
        if not path:
            return best
        path = os.path.dirname(path)


#: the quota of this process's own cgroup is read again after this many seconds (reading it
#: walks the cgroup tree: most of a millisecond, and every Pool() asks)
_QUOTA_TTL = 1.0
_quota_cache = (None, 0.0, None)  # (pid, monotonic time of the reading, value)


def cgroup_cpu_limit(root: str = "/") -> float | None:
    """The CPU quota (in CPUs, possibly fractional) of this process's cgroup, or None.

    ``root`` lets tests point at a fake file system tree. The real one's answer is kept for
    ``_QUOTA_TTL`` seconds (per process: a forked child may be in another cgroup).
    """
    global _quota_cache
    if root != "/":
        return _read_cgroup_limit(root)
    pid, when, value = _quota_cache
    now = time.monotonic()
    if pid != os.getpid() or now - when >= _QUOTA_TTL:
        value = _read_cgroup_limit(root)
        _quota_cache = (os.getpid(), now, value)
    return value


def _read_cgroup_limit(root: str) -> float | None:
    text = _read(os.path.join(root, "proc/self/cgroup"))
    if not text:
        return None
    limits = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, rel = parts
        if hid == "0" and controllers == "":
            limits.append(_cgroup_v2_limit(root, rel))
        elif "cpu" in controllers.split(","):
            limits.append(_cgroup_v1_limit(root, rel))
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def cpu_count() -> int:
    """CPUs this process can use: its affinity mask, capped by any cgroup CPU quota
    (rounded up: a 1.5-CPU quota gives 2). Always at least 1."""
    n = _affinity_count()
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def default_threads() -> int:
    """Thread-team size for kernels: ``OMP_NUM_THREADS`` when set to a positive integer
    (its first entry, as OpenMP reads a nested list), else :func:`cpu_count`."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return cpu_count()
