"""glibc's malloc, told to keep the memory the process frees for its next allocations.

By default glibc gives big blocks back to the kernel as soon as they are freed: a block above
its mmap threshold (dynamic, 128 KB rising to at most 32 MB) is mapped and unmapped on its own,
and free memory at the top of the heap is returned once it passes twice that threshold. A
training loop frees and allocates the same activations every micro-batch, so the kernel maps
and zeroes those pages again each time. On the 2-core VM the bench runs on, that was about
100k page faults per PPO update of the bench's work, at 2.5-4.8 us each (bench/RESULTS.md).

Kept instead (no trimming; blocks below 1 GiB from the heap), the pages are faulted in once,
in the first iteration, and reused after it. It costs memory where block sizes change from
step to step: a freed block that the next, larger one does not fit stays mapped beside it.
Measured on that VM: the PPO bench worker, the same peak RSS (1.94-1.99 vs 1.95-1.97 GiB)
and updates 7.49 -> 7.16 s; the default recipe's SFT stage (batches of different lengths, logits
of a different size each step) 105.7 -> 88.1 s, peak RSS 4.02 -> 4.68 GiB. With blocks up to
32 MB from the heap only (glibc's own largest threshold) the SFT stage took 110.4 s, 4.12 GiB.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
HEAP_BELOW = 1 << 30  # blocks smaller than this come from the heap, not their own mapping
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse; True if it took. A no-op (False)
    where the C library is not glibc (macOS, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Setting either parameter turns glibc's dynamic thresholds off, so both are set: the trim
    # threshold alone would leave the mmap threshold at 128 KB, and every activation of the
    # step would be mapped and faulted in again (measured: 2x slower updates).
    heap = mallopt(M_MMAP_THRESHOLD, HEAP_BELOW)
    kept = mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    return bool(heap and kept)
