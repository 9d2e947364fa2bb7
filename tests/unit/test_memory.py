"""worker/training/memory.py: freed tensor memory stays in the process instead of going back to the
kernel (and being faulted back in, zeroed, at the next step)."""

from __future__ import annotations

import ast
import platform
import subprocess
import sys

import pytest

# In a fresh process, three times: allocate a 20 MB tensor, read how many bytes glibc holds in
# mmapped blocks while it lives, free it, read the bytes of the heap (mallinfo2: glibc's own
# accounting, so the kernel's page reclaim cannot blur it). By default glibc maps the first block
# and unmaps it when freed; with keep_freed_memory it comes from the heap, which then never shrinks.
PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "on":
    from worker.training.memory import keep_freed_memory
    assert keep_freed_memory()
import torch
seen = []
for _ in range(3):
    block = torch.ones(5_000_000)
    mapped = libc.mallinfo2().hblkhd
    del block
    seen.append((mapped, libc.mallinfo2().arena))
print(seen)
"""


def _probe(mode: str) -> list[tuple[int, int]]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33),
                    reason="mallopt and mallinfo2 are glibc's (2.33+); elsewhere keep_freed_memory does nothing")
def test_a_freed_tensor_stays_in_the_heap_for_the_next_one():
    block = 20_000_000
    default, kept = _probe("off"), _probe("on")
    assert default[0][0] - kept[0][0] >= block * 0.9  # by default the first 20 MB block was mapped
    heap = [arena for _, arena in kept]
    assert heap == sorted(heap) and heap[0] >= block  # with the settings: from the heap, never trimmed
