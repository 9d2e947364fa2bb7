"""worker/training/memory.py: freed tensor memory stays in the process (no page faults on reuse)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# In a fresh process: allocate, touch and free a 20 MB tensor twice (the allocator settles), then
# count the minor page faults of doing it three times more. By default glibc hands the freed block
# back to the kernel (unmapped or trimmed) again and again, so the repeats fault in fresh pages;
# with keep_freed_memory they reuse the same pages.
PROBE = """
import resource, sys
if sys.argv[1] == "on":
    from worker.training.memory import keep_freed_memory
    assert keep_freed_memory()
import torch
def touch():
    torch.ones(5_000_000).sum()  # 20 MB
touch(), touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch(), touch(), touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt settings are glibc's; elsewhere keep_freed_memory does nothing")
def test_freed_tensor_memory_is_reused_without_page_faults():
    pages = 20_000_000 // 4096
    assert _faults("off") > pages // 2  # the default: fresh pages for the repeats, at least once
    assert _faults("on") < pages // 20
