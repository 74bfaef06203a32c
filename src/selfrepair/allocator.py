"""Keep freed memory for the next tensor instead of handing it back to the system.

glibc's allocator serves every allocation above 32 MiB (at most; less by default) with its own
``mmap`` and returns it with ``munmap`` when it is freed; the next tensor of that size is faulted in
again page by page, and the kernel zeroes every page. A CPU forward pass of a few thousand tokens
allocates and frees such tensors (an MLP's hidden activations, a stacked batch of ablated copies)
thousands of times: measured in the book's chapter 4 (Gemma-3-270M, 2 cores), a third of the
process's CPU time was the kernel's, about 200,000 page faults a second (see DEVELOPING.md).

:func:`keep_freed_memory` turns that off for this process with glibc's ``mallopt``: no ``mmap``
for allocations (``M_MMAP_MAX`` 0: they come from the heap, where freed chunks are reused) and no
trimming of the heap (``M_TRIM_THRESHOLD``). The price is that the process keeps its peak memory
until it exits. The book's model opener calls it for a model on the CPU
(:func:`selfrepair.experiment.open_model`: every chapter, ``selfrepair sweep`` / ``measure``), and
so does the test suite; a library user may call it once before measuring. Elsewhere than glibc (macOS, musl, Windows) it does nothing. Numbers do
not depend on it: only where memory comes from changes.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
KEEP = 2**31 - 1  # bytes of free heap top kept (the most mallopt takes)
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Whether this process's allocator now keeps freed memory (glibc); once per process."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):  # not glibc
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP))
    return _done


__all__ = ["keep_freed_memory"]
