"""The service's worker and thread defaults follow the CPUs a process may use: its affinity (`taskset`) and its
cgroup's CPU quota (a container's `--cpus`), not the machine's count. Real cgroups, made here; skipped, saying
why, where this user cannot make one."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from common.cpus import mount_points, usable_cpus
from tests.conftest import REPO

SETTINGS = (
    "from serving.settings import ServingSettings; s = ServingSettings(); print(s.workers, s.threads, s.bulk_threads)"
)


def cpu_hierarchy() -> Path:
    mounts = mount_points(Path("/proc/self/mountinfo").read_text())
    if "cpu" in mounts:  # cgroup v1 (or hybrid): the cpu controller's own hierarchy
        return mounts["cpu"][0]
    if "v2" in mounts and "cpu" in (mounts["v2"][0] / "cgroup.subtree_control").read_text().split():
        return mounts["v2"][0]
    pytest.skip("no cgroup hierarchy with the cpu controller here")


@pytest.fixture
def cgroup_with_quota():
    """A cgroup of its own whose quota is `cpus` CPUs; a command runs in it."""
    top = cpu_hierarchy()
    folder = top / f"fashion-mnist-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup in {top}: {exc}")

    def run_in(cpus: float, code: str, affinity: str | None = None) -> str:
        period = 100_000
        if (folder / "cpu.max").exists():
            (folder / "cpu.max").write_text(f"{int(cpus * period)} {period}")
        else:
            (folder / "cpu.cfs_period_us").write_text(str(period))
            (folder / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
        command = [sys.executable, "-c", code]
        if affinity:
            command = ["taskset", "-c", affinity, *command]
        join = f'echo $$ > {folder / "cgroup.procs"} && exec "$@"'
        done = subprocess.run(["sh", "-c", join, "sh", *command], cwd=REPO, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    yield run_in
    folder.rmdir()


def test_the_quota_caps_the_cpus_and_rounds_up(cgroup_with_quota):
    count = "from common.cpus import usable_cpus; print(usable_cpus())"
    assert cgroup_with_quota(0.5, count) == "1"
    assert cgroup_with_quota(1.5, count) == str(min(2, usable_cpus()))
    assert cgroup_with_quota(64, count) == str(usable_cpus())  # a quota above the CPUs there are: the CPUs


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no smaller affinity to set")
def test_the_service_defaults_to_one_worker_and_thread_per_usable_cpu(cgroup_with_quota):
    assert cgroup_with_quota(1, SETTINGS) == "1 1 1"
    assert cgroup_with_quota(64, SETTINGS, affinity="0") == "1 1 1"
    every = len(os.sched_getaffinity(0))
    assert cgroup_with_quota(64, SETTINGS) == f"{every} 1 {every}"
