"""Keep freed tensor memory in the process instead of handing it back to the kernel after every step.

torch's CPU allocator asks glibc's malloc for each tensor. glibc serves blocks above its mmap
threshold with a fresh mmap and gives them back with munmap when freed, and it trims the heap top
back to the kernel too, so a training loop that allocates the same few activation and gradient
buffers every step page-faults its way through freshly zeroed memory every step. A fused job's
stacked activations (megabytes each) hit this hardest: on the 2-core VM here a fused grid spent
0.15-0.47 s of ~1.5 s in the kernel (50,000-115,000 minor page faults); with the settings below,
almost none after warm-up. Memory held stays at the process's peak, which the training process
reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit; blocks above it are still mapped and unmapped,
# which costs little next to the work on a tensor that large.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed blocks up to 32 MiB and to keep up to 1 GiB of free heap.
    Returns whether it applied (False where the C library is not glibc, e.g. musl or macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not applied:
        log.info("mallopt refused the allocator settings; tensors' memory goes back to the kernel when freed")
    return applied
