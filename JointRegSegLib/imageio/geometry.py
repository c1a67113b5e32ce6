"""The voxel grid of an image and the `Volume` type (array + grid).

Conventions used everywhere in JointRegSeg:

- Arrays are indexed ``[i, j, k]`` in ITK index order (i runs fastest in the file), i.e. the
  transpose of ``SimpleITK.GetArrayFromImage``. A vector field has its components last.
- Physical space is ITK's LPS, in millimetres. Voxel index ``p`` (continuous, voxel centres at
  integers) sits at ``x = origin + direction @ (spacing * p)``; ``direction`` columns are the
  LPS unit vectors of the i, j, k axes (ITK's row-major ``GetDirection()`` reshaped to 3x3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Shape, spacing (mm), origin (LPS mm) and direction (3x3) of a 3D voxel grid."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=np.float64).reshape(3, 3))

    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix taking a voxel index (i, j, k, 1) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    @property
    def index_to_ras_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix taking a voxel index to RAS mm (NIfTI's and Slicer's world frame)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.index_to_physical_matrix

    @property
    def physical_to_index_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix taking an LPS point (mm) to a continuous voxel index."""
        return np.linalg.inv(self.index_to_physical_matrix)

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """Map continuous indices ``(..., 3)`` to LPS points ``(..., 3)``."""
        m = self.index_to_physical_matrix
        return np.asarray(index, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]

    def physical_to_index(self, point: np.ndarray) -> np.ndarray:
        """Map LPS points ``(..., 3)`` to continuous indices ``(..., 3)``."""
        m = self.physical_to_index_matrix
        return np.asarray(point, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]

    def same_as(self, other: "Geometry", atol: float = 1e-5) -> bool:
        """True when both grids have the same shape and (within ``atol``) spacing, origin, direction."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )


@dataclass(frozen=True)
class Volume:
    """A 3D image (or vector field, components last) with its grid. ``array`` is ``[i, j, k(, c)]``."""

    array: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        if tuple(self.array.shape[:3]) != self.geometry.shape:
            raise ValueError(f"array shape {self.array.shape} does not match grid shape {self.geometry.shape}")

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new volume on the same grid."""
        return Volume(array, self.geometry)
