"""`allocator.keep_freed_memory`: a freed large array stays in the process for the next one (glibc only)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import os, sys
import numpy as np
from JointRegSegLib.allocator import keep_freed_memory

kept = keep_freed_memory() if sys.argv[1] == "keep" else False


def resident_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


before = resident_mb()
block = np.ones(80 * 2**20 // 8)  # 80 MB, every page written
held = resident_mb() - before
del block
print(kept, held, resident_mb() - before)
"""


def freed_and_resident(mode: str) -> tuple[bool, float, float]:
    output = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout.split()
    return output[0] == "True", float(output[1]), float(output[2])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only (Linux with glibc)")
def test_a_freed_large_array_stays_in_the_process_only_when_asked():
    kept, held, after_free = freed_and_resident("keep")
    assert kept
    assert held > 70  # the array was resident
    assert after_free > 70  # freed, its memory stays in the process for the next array

    kept, held, after_free = freed_and_resident("default")
    assert not kept
    assert held > 70
    assert after_free < 10  # glibc's default: the array's own mapping, returned to the system when freed
