"""Pre-alignment of training volumes (`training.prealign`): label maps to their mean shape, scans by the NMI affine stage."""

import numpy as np
import torch

from JointRegSegLib.metrics.similarity import ncc
from JointRegSegLib.spatial import affine_to_displacement, fit_to_points, identity_grid, warp
from JointRegSegLib.training.prealign import align_maps, align_scans, centroids, shared_codes

SHAPE = (40, 44, 36)


def _ellipsoids() -> torch.Tensor:
    """A label map ``(1, 1, I, J, K)`` of six ellipsoids of different sizes, centres off any plane."""
    grid = identity_grid(SHAPE, dtype=torch.float64)[0]
    labels = torch.zeros(SHAPE, dtype=torch.int64)
    for code, centre, radii in (
        (2, (14, 16, 12), (6, 5, 4)), (3, (26, 15, 14), (5, 6, 4)), (4, (20, 28, 13), (4, 4, 5)),
        (5, (19, 21, 24), (6, 4, 4)), (7, (12, 28, 22), (3, 4, 3)), (9, (28, 27, 23), (4, 3, 4)),
    ):
        inside = sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0
        labels[inside] = code
    return labels[None, None]


def _moved(labels: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``labels`` sampled at ``matrix @ x`` (nearest): a structure at ``c`` moves to ``matrix^-1 c``."""
    return warp(labels.float(), affine_to_displacement(matrix.float(), SHAPE), mode="nearest").round().long()


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.mean([2.0 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()) for c in shared_codes(torch.stack([a, b]))]))


def _affine(degrees: float, scale: float, shift: tuple[float, float, float]) -> torch.Tensor:
    """A rotation about the grid's centre in the (i, j) plane, a scale and a shift, as a 4x4 index affine (float64)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    centre = torch.tensor([(n - 1) / 2.0 for n in SHAPE], dtype=torch.float64)
    linear = scale * torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre - linear @ centre + torch.tensor(shift, dtype=torch.float64)
    return matrix


def _largest_move(a: torch.Tensor, b: torch.Tensor) -> float:
    """The farthest apart two affines take a corner of the grid (so any of its points), in voxels."""
    corners = torch.cartesian_prod(*[torch.tensor([0.0, n - 1.0], dtype=torch.float64) for n in SHAPE])
    corners = torch.cat([corners, torch.ones(8, 1, dtype=torch.float64)], dim=1)
    return float(((corners @ (a - b).T)[:, :3]).norm(dim=1).max())


def test_least_squares_affine_is_exact_for_points_an_affine_relates():
    points = torch.tensor([[1.0, 2, 3], [7, 1, 2], [3, 9, 4], [2, 3, 11], [6, 6, 6], [0, 5, 1]], dtype=torch.float64)
    truth = _affine(17.0, 0.9, (1.5, -2.0, 0.5))
    moved = points @ truth[:3, :3].T + truth[:3, 3]
    assert torch.allclose(torch.as_tensor(fit_to_points(points.numpy(), moved.numpy())), truth, atol=1e-10)


def test_two_maps_an_affine_apart_meet_halfway():
    """Map 1 is map 0 sampled at ``T x``: its structures sit at ``T^-1 c``, so the mean shape is ``(c + T^-1 c) / 2`` and
    the least-squares affines are ``M_0 = (I + T^-1) / 2`` and ``M_1 = (I + T) / 2`` exactly, up to the centroids'
    rounding by nearest-neighbour sampling; the aligned maps overlap where the given ones do not."""
    first = _ellipsoids()
    transform = _affine(10.0, 1.1, (2.0, -1.5, 1.0))
    maps = torch.cat([first, _moved(first, transform)])
    aligned, matrices = align_maps(maps)
    eye = torch.eye(4, dtype=torch.float64)
    for found, expected in ((matrices[0], (eye + torch.linalg.inv(transform)) / 2), (matrices[1], (eye + transform) / 2)):
        assert _largest_move(torch.as_tensor(found), expected) < 0.3  # voxels, anywhere on the grid
    points = centroids(aligned, shared_codes(aligned))
    assert np.linalg.norm(points[0] - points[1], axis=1).max() < 1.0  # voxels: each map was sampled by nearest neighbour twice
    before, after = _dice(maps[0, 0], maps[1, 0]), _dice(aligned[0, 0], aligned[1, 0])
    assert before < 0.6 and after > 0.75, (before, after)  # small ellipsoids, each sampled by nearest neighbour twice
    assert aligned.dtype == maps.dtype and set(torch.unique(aligned).tolist()) <= set(torch.unique(maps).tolist())


def test_a_scan_is_brought_onto_its_reference():
    """A smooth image moved by a rotation and a shift comes back onto the unmoved one (the NMI affine stage)."""
    grid = identity_grid(SHAPE, dtype=torch.float32)[0]
    blobs = sum(torch.exp(-(((grid - torch.tensor(c, dtype=torch.float32).view(3, 1, 1, 1)) ** 2).sum(0)) / 30.0)
                for c in ((14, 16, 12), (26, 15, 14), (20, 28, 24), (12, 30, 20)))
    reference = (blobs / blobs.max())[None, None]
    scan = warp(reference, affine_to_displacement(_affine(8.0, 1.0, (2.0, 1.0, -1.5)).float(), SHAPE))
    aligned = align_scans(scan, reference)
    before, after = (ncc(reference[0, 0].numpy(), image[0, 0].numpy()) for image in (scan, aligned))
    assert before < 0.9 and after > 0.99, (before, after)
