"""What every DataLoader worker process of vlp sets up when it starts (`worker_init_fn`).

Heap growth in long-lived workers: a worker decodes JPEGs and builds image tensors of a few hundred KiB each,
millions of times in a streamed run. glibc's malloc raises its mmap threshold dynamically after the first
large frees (up to 32 MiB), after which such buffers come from the heap, and the heap's free space is
fragmented and not returned to the OS: with 2 workers the summed peak RSS of a 1 M-sample stream grew by
~21 % from 10 k samples (`benchmarks/stream_rss.py`, issue 15), against +1 % in the main process. Fixing the
threshold at 64 KiB (`mallopt(M_MMAP_THRESHOLD)`, which also turns the dynamic adjustment off) serves those
buffers by mmap, returned to the OS on free: the same run measured +0.9 % with the equivalent
`MALLOC_MMAP_THRESHOLD_=65536`. Elsewhere than glibc (musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
WORKER_MMAP_THRESHOLD = 64 * 1024


def set_mmap_threshold(threshold: int = WORKER_MMAP_THRESHOLD, libc: Optional[ctypes.CDLL] = None) -> bool:
    """Serve allocations of `threshold` bytes or more by mmap in this process (glibc `mallopt`); returns whether
    it was applied (False without glibc's mallopt, or when glibc refuses the value)."""
    if libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))


def data_worker_init(worker_id: int) -> None:
    """`worker_init_fn` of vlp's DataLoaders: bound the worker's heap growth (`set_mmap_threshold`)."""
    set_mmap_threshold()
