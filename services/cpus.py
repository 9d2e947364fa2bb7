"""How many CPUs this process may really use: the affinity mask (taskset, a cpuset) and a container's
CPU quota (docker's ``cpus:``, a Kubernetes limit), not the host's count, which both can cut down.

Pure reads of the kernel's files; no torch. The worker's default training processes and each
process's torch threads (worker/celery_app.py) come from here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP_ROOT) -> int | None:
    """Whole CPUs the cgroup's quota allows, rounded up (1.5 CPUs -> 2), or None when it has none.
    cgroup v2: ``cpu.max`` holds "<quota> <period>" or "max <period>"; cgroup v1:
    ``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us`` under ``cpu`` or ``cpu,cpuacct``."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        for folder in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
            try:
                quota = (folder / "cpu.cfs_quota_us").read_text().strip()
                period = (folder / "cpu.cfs_period_us").read_text().strip()
                break
            except OSError:
                continue
        else:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def usable_cpus(*, root: Path = CGROUP_ROOT, affinity: Collection[int] | None = None) -> int:
    """CPUs this process may run on at once: the CPUs of its affinity mask (``affinity``, default
    os.sched_getaffinity), capped by the cgroup's quota under ``root``; at least 1."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # macOS has no affinity mask
            affinity = range(os.cpu_count() or 1)
    count = max(1, len(affinity))
    quota = cpu_quota(root)
    return count if quota is None else max(1, min(count, quota))
