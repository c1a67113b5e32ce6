"""Jacobian determinant of a physical displacement field, % folding and SDlogJ.

The field is a `Volume` with array (I, J, K, 3): LPS millimetre displacements u on the fixed grid
(fixed point x maps to x + u(x)). The Jacobian of the mapping is I + du/dx with the derivative
taken with respect to PHYSICAL coordinates:

    du/dx = (du/dindex) @ inv(direction @ diag(spacing)),

du/dindex from central differences inside the grid and one-sided differences on the outermost
voxels (as ``np.gradient``, edge_order=1), in torch (on the GPU with ``device``).

Relation to SimpleITK's ``DisplacementFieldJacobianDeterminant`` (ITK 5, checked against
SimpleITK 2.5): ITK divides the index differences by the spacing but IGNORES the direction
matrix, so it equals this function on grids with identity direction; on oblique grids ITK's
value is wrong for a physical field, and this one equals ITK applied to the field with its
vectors rotated into the grid axes (``direction.T @ u``). At the outermost voxels ITK pads with
zero flux (the neighbour outside the image repeats the border value), which halves the one-sided
difference; this function uses the full one-sided difference there. Interiors agree exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..imageio.geometry import Volume
from .similarity import as_array

_SLAB = 32  # voxels along i per chunk: bounds the temporaries (9 derivative planes of the chunk)


def _difference(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x[p + 1] - x[p - 1]`` along ``dim`` at every plane, the planes outside ``x`` extrapolated linearly
    (``2 x_0 - x_1``, ``2 x_{n-1} - x_{n-2}``): the one-sided difference times two at the first and last plane."""
    n = x.shape[dim]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.sub(x.narrow(dim, 2, n - 2), x.narrow(dim, 0, n - 2), out=out.narrow(dim, 1, n - 2))
    first, second = x.narrow(dim, 0, 1), x.narrow(dim, 1, 1)
    last, before_last = x.narrow(dim, n - 1, 1), x.narrow(dim, n - 2, 1)
    out.narrow(dim, 0, 1).copy_(second - (2.0 * first - second))
    out.narrow(dim, n - 1, 1).copy_((2.0 * last - before_last) - before_last)
    return out


def _determinant(m: list[list[torch.Tensor]]) -> torch.Tensor:
    """det of 3x3 matrices given entry by entry, by cofactor expansion along the first row (in the order
    ``m00 (m11 m22 - m12 m21) - m01 (m10 m22 - m12 m20) + m02 (m10 m21 - m11 m20)``, in place where it can)."""
    minor = torch.mul(m[1][1], m[2][2]).sub_(torch.mul(m[1][2], m[2][1]))
    det = torch.mul(m[0][0], minor)
    torch.mul(m[1][0], m[2][2], out=minor).sub_(torch.mul(m[1][2], m[2][0]))
    det.sub_(minor.mul_(m[0][1]))
    torch.mul(m[1][0], m[2][1], out=minor).sub_(torch.mul(m[1][1], m[2][0]))
    return det.add_(minor.mul_(m[0][2]))


def jacobian_determinant(field: Volume, device: str | torch.device | None = None) -> Volume:
    """det(I + du/dx) of a physical displacement field, as a `Volume` on the field's grid.

    With ``L = direction @ diag(spacing)`` (index steps to mm) and ``D = du/dindex``,
    ``I + D L^-1 = (L + D) L^-1``, so ``det = det(L + D) / det(L)``: nine derivative planes and no
    per-voxel matrix product. Computed in slabs along i on ``device`` (default the CPU), in the
    field's own precision (float32 for a float32 field, the worker's; float64 for float64 fields).
    """
    if not isinstance(field, Volume):
        raise InputError(f"the displacement field must be a Volume (array + grid), got {type(field).__name__}")
    u = field.array
    if u.ndim != 4 or u.shape[3] != 3:
        raise InputError(f"a displacement field needs an (I, J, K, 3) array, got shape {u.shape}")
    if min(u.shape[:3]) < 2:
        raise InputError(f"a displacement field needs at least 2 voxels along each axis, got {u.shape[:3]}")
    geometry = field.geometry
    linear = geometry.direction @ np.diag(geometry.spacing)
    scale = 1.0 / float(np.linalg.det(linear))
    dtype = torch.float64 if u.dtype == np.float64 else torch.float32
    source = torch.from_numpy(np.ascontiguousarray(u))
    det = torch.empty(u.shape[:3], dtype=dtype)
    n = u.shape[0]
    for start in range(0, n, _SLAB):
        stop = min(start + _SLAB, n)
        rows = stop - start
        # rows start-1 .. stop (one halo row each side inside the image): (3, rows + halos, J, K)
        low = max(start - 1, 0)
        chunk = source[low : min(stop + 1, n)].to(device=device, dtype=dtype).permute(3, 0, 1, 2).contiguous()
        own = chunk.narrow(1, start - low, rows)
        # d[a][c] = du_c / dindex_a: central differences (one-sided on the image's outermost voxels)
        d = [_difference(chunk, 1).narrow(1, start - low, rows), _difference(own, 2), _difference(own, 3)]
        m = [[d[a][c].mul_(0.5).add_(float(linear[c, a])) for a in range(3)] for c in range(3)]
        det[start:stop] = _determinant(m).mul_(scale).cpu()
    return Volume(det.numpy(), geometry)


def deformable_jacobian(jacobian: Volume, affine: np.ndarray | None) -> Volume:
    """det J of the deformable part alone: the whole mapping's det J divided by the affine part's.

    For a mapping phi = A o psi or psi o A with A affine (linear part L), det J_phi = det L * det J_psi,
    det L being constant; so a pure affine mapping gives 1 everywhere. ``affine`` is the 4x4 (LPS mm)
    matrix of the method's affine part; without one the mapping is all deformable.
    """
    if affine is None:
        return jacobian
    scale = float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))
    if not np.isfinite(scale) or scale == 0.0:
        raise InputError(f"the affine part is singular (det {scale}); its Jacobian cannot be separated")
    return jacobian.with_array(jacobian.array / scale)

def _masked_values(jac: np.ndarray | Volume, mask: np.ndarray | Volume | None) -> np.ndarray:
    values = as_array(jac, "Jacobian determinant")
    if mask is None:
        return values.ravel()
    m = as_array(mask, "mask")
    if m.shape != values.shape:
        raise InputError(f"mask shape {m.shape} differs from the Jacobian map's shape {values.shape}")
    m = m.astype(bool)
    if not m.any():
        raise InputError("the mask is empty: give a mask with at least one voxel inside")
    return values[m]


def folding_percent(jac: np.ndarray | Volume, mask: np.ndarray | Volume | None = None) -> float:
    """Percentage of voxels (inside the mask) whose Jacobian determinant is <= 0."""
    values = _masked_values(jac, mask)
    return float(100.0 * np.count_nonzero(values <= 0) / values.size)


def sdlogj(jac: np.ndarray | Volume, mask: np.ndarray | Volume | None = None, shift: float = 3.0) -> float:
    """Standard deviation of log Jacobian determinant, Learn2Reg convention (Hering et al. 2022).

    The Learn2Reg evaluation script computes ``std(log(clip(det + 3, 1e-9, 1e9)))`` (population
    std), shifting by 3 so that folded voxels stay finite; ``shift=3`` reproduces it and makes
    values comparable to papers that follow that protocol. ``shift=0`` gives the plain
    ``std(log(clip(det, 1e-9, 1e9)))``.
    """
    values = _masked_values(jac, mask)
    return float(np.std(np.log(np.clip(values + shift, 1e-9, 1e9))))
