"""``jointregseg batch``: register a cohort of pairs on Dask (one machine or a cluster), resumably.

- `pairlist`: the pairs, from a pair-list CSV (the benchmark's format) or a folder of images
  registered to one fixed image or the shipped atlas;
- `resume`: what a finished result or a recorded failure was made from (input checksums and the
  job's definition), so that a rerun repeats no work;
- `task`: one pair and method, run by the registration worker in its own process on a Dask worker
  (standard library only, so that Dask workers do not import torch);
- `cluster`: a `LocalCluster` sized to the machine, or a connection to a running scheduler;
- `runner`: plan, submit, follow, stop cleanly on Ctrl-C;
- `summary` and `figures`: ``summary.csv``, ``failures.csv`` and a PNG per method;
- `command`: the command-line options.
"""

DEFAULT_SEG_SUFFIX = "_seg"
"""Folder form: ``NAME_seg.nii.gz`` is the label map of ``NAME.nii.gz``."""
