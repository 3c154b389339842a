"""The host allocator in worker processes: the pages of freed blocks go back to the operating system between units.

glibc's malloc serves a block from mmap (unmapped again when freed) only above its mmap threshold, which starts at
128 KiB and rises to the size of each mmapped block that is freed, up to 32 MiB. Past that, a worker's large tensors
(an expert's float32 weight at 235B width is 24 MiB, its bf16 source 12 MiB) are carved out of the heaps of the
thread that makes them, the compute thread's and the prefetch thread's, and a freed one stays resident while
anything allocated after it lives. Measured at 235B width, 2 layers (docs/benchmarks.md, "Real width"): resident
memory climbed by 0.5-1 GiB per expert group, to 6.8 GiB on a single card and 6.3-6.9 GiB in each of 2 Ray actors,
where the units need 4.3. Trimmed at the start of each unit: 5.1 and 5.2-5.5 GiB at the same speed. (Pinning the
threshold low instead, so that every large tensor is mmapped, gave 4.9-5.0 GiB but cost 15% on the single card: a
fresh mapping is zeroed page by page each time.)
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    """The C library's malloc_trim, or None. Looked up among the symbols this process already has (dlopen(NULL)):
    ctypes.util.find_library would fork the worker to run ldconfig."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Give the pages of every freed block in every thread's heap back to the operating system (glibc's
    malloc_trim(0)); False where the C library has no malloc_trim (nothing done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


__all__ = ["release_free_memory"]
