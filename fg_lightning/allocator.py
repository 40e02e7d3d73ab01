"""The CPU allocator's thresholds for training (``fg-cli`` and ``fg-bench`` set them as they start).

glibc's ``malloc`` gives every block above its mmap threshold (128 KiB, rising to 32 MiB as such blocks are freed)
its own mapping and returns it to the system when it is freed, and trims its heap's free top past 128 KiB. A training
step allocates the same large tensors every step, so on the CPU each step pays their page faults again: the first
touch of every 4 KiB page of an activation, and of the ten-direction tangents of activity perturbation, ten times an
activation. :func:`keep_freed_memory` raises both thresholds, so that the process keeps what it freed for the next
step (its resident memory stays at its peak, as a GPU's caching allocator keeps it). Measured on the recipe CNN
(batch 256, one thread, the cases in turn, a training run beside them): backprop's step 170 → 155 ms,
local_activity's (k = 10) 336 → 216 ms (``results/cpu/speed-recipe``'s README). A GPU's memory is not malloc's, and
torch's own thresholds are not touched."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64 bits (half its heap size): larger blocks stay mapped
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Raises glibc's mmap threshold to 32 MiB and its trim threshold to 2 GiB for this process; whether it did
    (False off Linux, or with another C library)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
