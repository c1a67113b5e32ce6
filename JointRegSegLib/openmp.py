"""OpenMP's waiting threads put to sleep in a process that runs one job (``OMP_WAIT_POLICY=PASSIVE``).

torch's CPU kernels and oneDNN's convolutions run on OpenMP threads (GNU libgomp in the Linux wheels). Between two
parallel loops those threads spin, by default, for a while before they sleep: fast when one loop follows another
on otherwise idle cores, but a job here runs work beside its main thread (the evaluation's numbers before
registration, hof's fixed image beside its affine stage, the background writing), and threads that spin take
the core that work needs. With the passive policy they sleep at once. The Slicer module's job on the benchmark
pair (`register --no-pictures --no-compress`, 2 threads, three runs each beside the code before; medians;
`docs/results/call_profile.md`, twentieth run), the job after start-up: hof 3.61 -> 3.14 s, uresnet 2.07 -> 1.90 s,
jers 2.49 -> 1.97 s; segreg's learned variant (4.36 s) and tto (4.56 -> 4.55 s), whose steps run on both cores
with little beside them, the same.

libgomp reads the policy once, when it is loaded (by ``import torch``), so `sleeping_threads` must run before that;
a policy the user set in the environment is kept.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"


def sleeping_threads() -> bool:
    """Ask OpenMP for the passive wait policy unless the environment names one; True where it takes effect (torch
    not yet imported and no policy of the user's)."""
    if "torch" in sys.modules or WAIT_POLICY in os.environ:
        return False
    os.environ[WAIT_POLICY] = "PASSIVE"
    return True
