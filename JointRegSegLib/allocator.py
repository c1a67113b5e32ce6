"""Freed memory kept in the process for the next large array, where the C library is glibc (Linux).

A run allocates and frees large arrays one after another: every step on the 1 mm grid makes a few
temporaries of 25-80 MB (numpy's and torch's), each of them above glibc's mmap threshold (128 KiB,
raised as blocks are freed up to 32 MiB). glibc gives each such array a fresh mapping and returns it to
the kernel when it is freed, so the next array is faulted in and zeroed page by page again. With the
thresholds raised (`keep_freed_memory`) the freed blocks stay in the process's heap and serve the next
arrays. uresnet's module job on the benchmark pair (`register --no-pictures --no-compress`, three runs
each beside the code before): CPU in the kernel 1.8-2.0 -> 1.0-1.3 s, the job 3.5-3.7 -> 3.2-3.4 s; hof's
job 7.4-7.9 -> 5.8-6.2 s. The cost is memory where freed blocks are too fragmented to serve later arrays:
segreg's learned variant peaks at 2.1-2.5 GB instead of 1.8 GB (the other methods within 0.2 GB;
`docs/results/call_profile.md`, "Twelfth run", on a virtual machine whose first touch of memory is slow,
which makes the gain larger than on a machine whose memory is its own). The memory goes back to the
system when the process ends, so only processes that run one job call it (the worker, ``jointregseg
register`` and ``demo``), not the Slicer or web page's own process.

Elsewhere (macOS, Windows, musl) nothing changes: their allocators are not glibc's and have no
``mallopt``.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h: free memory at the heap's top above this is returned to the system
M_MMAP_THRESHOLD = -3  # blocks from this size on get a mapping of their own (unmapped when freed)
MMAP_THRESHOLD = 1 << 30  # larger than any array of a run on a brain MRI (a 1 mm field: 80 MB)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt's largest value (an int)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (module docstring); True where that was done."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
