"""CPU performance settings for training and inference processes."""

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Makes glibc reuse freed heap memory instead of returning it to the OS.

    PyTorch's large CPU tensors are otherwise freshly mapped for every
    allocation and page-faulted on first touch, which costs as much as the
    arithmetic of the selective scan (benchmarks/results/cpu_scan.md: the scan
    runs about 2x faster with this). The process keeps its peak memory
    reserved. Same as starting it with
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``.
    Returns False (and changes nothing) where the C library is not glibc.

    Example
    -------
    >>> isinstance(keep_freed_memory(), bool)
    True
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if ok:
        logger.debug("glibc keeps freed memory for reuse (mmap_max=0, trim_threshold=2 GiB)")
    return ok
