"""Usable CPUs: the affinity mask capped by a container's CPU quota, read from fake cgroup files."""

from __future__ import annotations

import os

import pytest

from services.config import Settings
from services.cpus import cpu_quota, usable_cpus


def _v2(root, text):
    root.mkdir(exist_ok=True)
    (root / "cpu.max").write_text(text)
    return root


def _v1(root, quota, period, folder="cpu,cpuacct"):
    (root / folder).mkdir(parents=True)
    (root / folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / folder / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize(("text", "expected"), [
    ("max 100000\n", None),            # no quota
    ("200000 100000\n", 2),            # docker --cpus 2
    ("150000 100000\n", 2),            # 1.5 CPUs: a second process still gets half a core
    ("50000 100000\n", 1),             # half a CPU: still one
    ("400000 50000\n", 8),
])
def test_cgroup_v2_quota(tmp_path, text, expected):
    assert cpu_quota(_v2(tmp_path, text)) == expected


@pytest.mark.parametrize(("quota", "period", "expected"), [(-1, 100000, None), (300000, 100000, 3), (1, 100000, 1)])
@pytest.mark.parametrize("folder", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_quota(tmp_path, quota, period, expected, folder):
    assert cpu_quota(_v1(tmp_path, quota, period, folder)) == expected


def test_no_cgroup_files_or_garbage_mean_no_quota(tmp_path):
    assert cpu_quota(tmp_path) is None
    assert cpu_quota(_v2(tmp_path / "g", "nonsense\n")) is None


def test_the_affinity_mask_caps_and_is_capped_by_the_quota(tmp_path):
    eight = range(8)
    assert usable_cpus(root=tmp_path, affinity=eight) == 8                         # no quota: the mask
    assert usable_cpus(root=_v2(tmp_path / "a", "300000 100000"), affinity=eight) == 3  # quota below the mask
    assert usable_cpus(root=_v2(tmp_path / "b", "1600000 100000"), affinity={0, 5}) == 2  # mask below the quota
    assert usable_cpus(root=_v1(tmp_path / "c", 200000, 100000), affinity=eight) == 2
    assert usable_cpus(root=tmp_path, affinity=set()) == 1


def test_this_process_counts_its_affinity_mask_not_the_host(tmp_path):
    # The real mask, not os.cpu_count(): `taskset -c 0 fitscope worker` gets one process.
    assert usable_cpus(root=tmp_path) == len(os.sched_getaffinity(0))


def test_worker_concurrency_defaults_to_the_usable_cpus_and_the_setting_overrides(monkeypatch):
    import services.cpus

    monkeypatch.setattr(services.cpus, "usable_cpus", lambda: 6)
    assert Settings().worker_concurrency is None
    assert Settings().effective_worker_concurrency == 6
    assert Settings(worker_concurrency=3).effective_worker_concurrency == 3
    monkeypatch.setenv("FITSCOPE_WORKER_CONCURRENCY", "")  # compose's unset ${VAR:-}: the default
    assert Settings().effective_worker_concurrency == 6
    monkeypatch.setenv("FITSCOPE_WORKER_CONCURRENCY", "2")
    assert Settings().effective_worker_concurrency == 2
    monkeypatch.setattr(services.cpus, "usable_cpus", lambda: 1000)
    monkeypatch.delenv("FITSCOPE_WORKER_CONCURRENCY")
    assert Settings().effective_worker_concurrency == 256  # the setting's own cap


def test_the_banner_says_how_many_processes(monkeypatch):
    import services.cpus
    from services.launcher import worker_banner

    monkeypatch.setattr(services.cpus, "usable_cpus", lambda: 4)
    assert worker_banner(Settings()) == "4 training processes (one per usable CPU)"
    assert worker_banner(Settings(worker_concurrency=1)) == "1 training process (FITSCOPE_WORKER_CONCURRENCY)"
