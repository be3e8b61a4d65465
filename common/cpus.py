"""How many CPUs this process may use: what worker, thread and batch defaults are sized by.

`os.cpu_count()` counts the machine's CPUs; a container on a 64-core node limited to 2 CPUs may use 2. The
count here is the process's CPU affinity (cpusets, `taskset`), capped by the CPU quota of its cgroup and every
cgroup above it (cgroup v2's `cpu.max`, v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def mount_points(mountinfo: str) -> dict[str, tuple[Path, str]]:
    """The cgroup v2 hierarchy (key `v2`) and the v1 one holding the cpu controller (key `cpu`): each one's
    mount point and the cgroup mounted there (`/`, or a container's own where it sees only that), from
    /proc/self/mountinfo's lines (`id parent dev root mount-point options - fstype source super-options`)."""
    found: dict[str, tuple[Path, str]] = {}
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        parts, rest = fields.split(), tail.split()
        if len(parts) < 5 or len(rest) < 3:
            continue
        root, point, fstype, options = parts[3], Path(parts[4]), rest[0], rest[2].split(",")
        if fstype == "cgroup2":
            found.setdefault("v2", (point, root))
        elif fstype == "cgroup" and "cpu" in options:
            found.setdefault("cpu", (point, root))
    return found


def quota_cpus(folder: Path, top: Path) -> float | None:
    """The tightest CPU quota of `folder` and its parents up to `top`, in CPUs; None where none is set."""
    limits = []
    while True:
        with_max, v1 = folder / "cpu.max", folder / "cpu.cfs_quota_us"
        if with_max.is_file():
            quota, _, period = with_max.read_text().partition(" ")
            if quota != "max":
                limits.append(int(quota) / int(period))
        elif v1.is_file():
            quota_us = int(v1.read_text())
            if quota_us > 0:
                limits.append(quota_us / int((folder / "cpu.cfs_period_us").read_text()))
        if folder == top or top not in folder.parents:
            return min(limits) if limits else None
        folder = folder.parent


def cgroup_quota() -> float | None:
    """This process's CPU quota in CPUs (v2 where the cpu controller is there, else v1); None: unlimited or
    unknown (no cgroup file system)."""
    try:
        mounts = mount_points(Path("/proc/self/mountinfo").read_text())
        memberships = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in memberships:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and "v2" in mounts:
            top, mounted = mounts["v2"]
        elif "cpu" in controllers.split(",") and "cpu" in mounts:
            top, mounted = mounts["cpu"]
        else:
            continue
        inside = os.path.relpath(path, mounted) if path.startswith(mounted) else "."
        quota = quota_cpus((top / inside).resolve(), top)
        if quota is not None:
            return quota
    return None


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by its cgroups' CPU quota (rounded up), at least 1."""
    affinity = len(os.sched_getaffinity(0))
    quota = cgroup_quota()
    return max(1, min(affinity, math.ceil(quota)) if quota else affinity)
