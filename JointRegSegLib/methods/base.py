"""The method protocol every registration method implements (DESIGN.md, "The method protocol").

The worker, the command line, the benchmark and the Slicer module only ever talk to a method
through `MethodInfo` and `Method.register`, so none of them special-cases a method. Training builds
on the methods (`JointRegSegLib.training`, one trainer per network); a method never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from ..imageio.geometry import Volume
from .catalogue import MethodInfo

ProgressCallback = Callable[[float, str], None]
"""``progress(fraction in [0, 1], stage)``; may raise to cancel the run."""


@dataclass
class Inputs:
    """One registration problem: images, and label maps where available (each on its own grid)."""

    fixed: Volume
    moving: Volume
    fixed_seg: Volume | None = None
    moving_seg: Volume | None = None


@dataclass
class Options:
    """Run options shared by every method; method-specific ones go in ``extra``."""

    device: str = "cpu"
    seed: int = 0
    iterations: int | None = None
    time_budget: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """A method's output, all on the fixed image's grid (DESIGN.md "Result").

    ``displacement`` is the whole mapping (affine and deformable composed) as a physical LPS mm
    field in ITK's convention: fixed point x maps to x + u(x) in the moving image.
    ``affine`` is the affine part alone (4x4, LPS mm, fixed point -> moving point) where the
    method has one. ``brain_mask`` and ``extracted`` (the moving image with everything but the
    brain set to 0) lie on the moving image's grid, where a method strips the skull. ``details`` holds method-specific numbers (losses, iterations, weights used).
    """

    displacement: Volume
    warped: Volume
    affine: np.ndarray | None = None
    fixed_seg: Volume | None = None
    moving_seg: Volume | None = None
    warped_seg: Volume | None = None
    brain_mask: Volume | None = None
    extracted: Volume | None = None
    weights: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    """A registration method: see the module docstring."""

    info: MethodInfo

    def register(self, inputs: Inputs, options: Options, progress: ProgressCallback) -> Result:
        """Register ``inputs.moving`` onto ``inputs.fixed``."""
        ...
