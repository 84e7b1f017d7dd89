"""Keep freed CPU memory in the process for reuse instead of handing it back after each batch.

glibc's malloc maps allocations above its mmap threshold afresh and returns the top of the heap to
the system once more than its trim threshold is free. An index build allocates and frees tens of
megabytes per batch, so the kernel would zero-fill the same pages again for every batch: measured
on a 2-core machine, 25-50 ms of system time per batch of 64 demo images, as much as the compute.
Raising both thresholds (what preloading jemalloc or tcmalloc achieves) removes that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems


@functools.cache
def keep_freed_memory(trim_mb: int = 256) -> bool:
    """Let malloc keep up to ``trim_mb`` of freed memory and serve blocks below 32 MB from it.

    Applies to the whole process, once; a no-op outside Linux with glibc.

    Returns
    -------
    bool
        Whether both settings were applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_mb * 2**20)
    )
