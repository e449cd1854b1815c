"""cpu_count(): affinity and cgroup v1/v2 quotas, read from a fake file system tree."""
import os

import pytest

import pyparallel
from pyparallel import _cpu


def write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota(tmp_path):
    write(tmp_path, "proc/self/cgroup", "0::/user.slice/job\n")
    write(tmp_path, "sys/fs/cgroup/user.slice/job/cpu.max", "150000 100000\n")
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) == 1.5


def test_cgroup_v2_smallest_ancestor_wins(tmp_path):
    write(tmp_path, "proc/self/cgroup", "0::/a/b\n")
    write(tmp_path, "sys/fs/cgroup/a/b/cpu.max", "max 100000\n")
    write(tmp_path, "sys/fs/cgroup/a/cpu.max", "300000 100000\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "50000 100000\n")
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) == 0.5


def test_cgroup_v2_unlimited(tmp_path):
    write(tmp_path, "proc/self/cgroup", "0::/\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "max 100000\n")
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) is None


def test_cgroup_v1_quota(tmp_path):
    write(tmp_path, "proc/self/cgroup", "5:cpuacct,cpu:/docker/abc\n3:memory:/docker/abc\n")
    write(tmp_path, "proc/self/mountinfo",
          "30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
          "31 25 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n")
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "250000\n")
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) == 2.5


def test_cgroup_v1_unlimited(tmp_path):
    write(tmp_path, "proc/self/cgroup", "5:cpu,cpuacct:/\n")
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n")
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) is None


def test_no_cgroup_files(tmp_path):
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) is None


def test_cpu_count_takes_the_smaller(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(_cpu, "cgroup_cpu_limit", lambda root="/": 2.2)
    assert pyparallel.cpu_count() == 3
    monkeypatch.setattr(_cpu, "cgroup_cpu_limit", lambda root="/": 0.3)
    assert pyparallel.cpu_count() == 1
    monkeypatch.setattr(_cpu, "cgroup_cpu_limit", lambda root="/": None)
    assert pyparallel.cpu_count() == 6


def test_cpu_count_honours_real_affinity():
    assert 1 <= pyparallel.cpu_count() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value,expected", [("3", 3), ("4,2", 4), ("0", None), ("x", None), ("", None)])
def test_default_threads_from_omp_num_threads(monkeypatch, value, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert _cpu.default_threads() == (expected or pyparallel.cpu_count())
