"""A network's class probabilities brought onto a scan's grid (`methods.class_sampling.argmax_on`): the argmax of
scipy's linear interpolation of every class, whichever path computes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial.transform import Rotation

from JointRegSegLib.imageio.geometry import Geometry
from JointRegSegLib.methods.class_sampling import FEW_CLASSES, argmax_on

NETWORK_GRID = Geometry(shape=(12, 14, 10), spacing=(3.0, 3.0, 3.0), origin=(16.5, 19.5, -13.5), direction=np.diag([-1.0, -1.0, 1.0]))


def probabilities(classes: int, seed: int) -> torch.Tensor:
    """Class probabilities on `NETWORK_GRID` as a segmentation network gives them: regions (around random seeds) of
    one class, softened borders, noise. With hof's 29 classes its cells take every path of `argmax_on`: 38 % of one
    class, 44 % with at most 4 classes that can win, 18 % with more."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, 1, (classes, 3)) * (np.asarray(NETWORK_GRID.shape) - 1)
    index = np.moveaxis(np.indices(NETWORK_GRID.shape), 0, -1)
    regions = ((index[..., None, :] - seeds) ** 2).sum(-1).argmin(-1)
    soft = np.stack([gaussian_filter((regions == c).astype(np.float64), 1.0) for c in range(classes)])
    return torch.softmax(torch.from_numpy(8.0 * soft + 0.3 * rng.normal(size=soft.shape)).float(), dim=0)


def scan_grids() -> dict[str, Geometry]:
    """A 1 mm LIA grid whose every third voxel centre is a node of the network grid (hof's 3 mm case: points on cell
    faces and corners), reaching past the network grid; and an oblique anisotropic one."""
    lia = np.array([[-1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    steps = NETWORK_GRID.physical_to_index_matrix[:3, :3] @ lia  # a 1 mm step of each LIA axis in network voxels (+-1/3)
    axis, sign = np.abs(steps).argmax(axis=0), np.sign(steps[np.abs(steps).argmax(axis=0), range(3)])
    sizes = np.asarray(NETWORK_GRID.shape)[axis]
    start = np.where(sign > 0, -2.0, sizes + 1.0)[np.argsort(axis)]  # a network node two voxels outside the grid
    aligned = Geometry(shape=tuple(int(v) for v in 3 * (sizes + 3) + 1), spacing=(1.0, 1.0, 1.0),
                       origin=tuple(NETWORK_GRID.index_to_physical(start)), direction=lia)
    direction = Rotation.from_euler("xyz", (12.0, -7.0, 25.0), degrees=True).as_matrix()
    shape, spacing = np.array([34, 30, 36]), np.array([1.1, 1.3, 0.9])
    centre = NETWORK_GRID.index_to_physical((np.asarray(NETWORK_GRID.shape) - 1) / 2.0)
    oblique = Geometry(shape=tuple(shape), spacing=tuple(spacing), origin=centre - direction @ (spacing * (shape - 1) / 2), direction=direction)
    return {"aligned": aligned, "oblique": oblique}


@pytest.mark.parametrize("classes", [4, FEW_CLASSES + 21])  # jers' tissues (every class everywhere); hof's 29 (by cells)
@pytest.mark.parametrize("grid_name", ["aligned", "oblique"])
def test_argmax_on_is_the_argmax_of_scipys_linear_interpolation(classes, grid_name):
    target = scan_grids()[grid_name]
    probs = probabilities(classes, seed=classes)
    ours = argmax_on(probs, NETWORK_GRID, target).numpy()
    index = NETWORK_GRID.physical_to_index(target.index_to_physical(np.moveaxis(np.indices(target.shape), 0, -1)))
    # every class interpolated linearly at every voxel, zero around the grid (scipy's grid-constant mode)
    sampled = np.stack([map_coordinates(p.numpy().astype(np.float64), np.moveaxis(index, -1, 0), order=1, mode="grid-constant") for p in probs])
    truth = sampled.argmax(axis=0)
    ranked = np.sort(sampled, axis=0)
    tie = ranked[-1] - ranked[-2] < 1e-5  # float32 against double: near-ties may differ, and points no voxel reaches
    inside = np.all((index >= 0) & (index <= np.asarray(NETWORK_GRID.shape) - 1), axis=-1)
    assert 0.3 < inside.mean() < 1.0 and len(np.unique(truth[inside])) == classes and tie[inside].mean() < 0.01
    assert np.array_equal(ours[~tie], truth[~tie])
    far = np.any((index < -1.01) | (index > np.asarray(NETWORK_GRID.shape) + 0.01), axis=-1)  # over a voxel off the grid
    assert far.any() and (ours[far] == 0).all()


def test_borders_follow_the_interpolated_probabilities_not_the_nearest_network_voxel():
    # Two classes (and empty ones) along i, a linear ramp between network voxels 4 and 5: the border lies where the
    # interpolated ramp crosses 0.5, a sixth of the way from voxel 4, not halfway (where nearest neighbour puts it).
    probs = torch.zeros((FEW_CLASSES + 1, *NETWORK_GRID.shape))
    ramp = torch.from_numpy(np.clip(np.arange(NETWORK_GRID.shape[0]) - 4 + 0.4, 0, 1)).float()[:, None, None]  # 0.4 at 4, 1 at 5
    probs[1], probs[2] = 0.05 + 0.9 * (1 - ramp), 0.05 + 0.9 * ramp
    fine = Geometry(shape=(34, 4, 4), spacing=(NETWORK_GRID.spacing[0] / 3, 3.0, 3.0), origin=NETWORK_GRID.origin, direction=NETWORK_GRID.direction)
    labels = argmax_on(probs, NETWORK_GRID, fine).numpy()[:, 1, 1]
    position = np.arange(34) / 3  # network index along i of each fine voxel
    crossing = 4 + (0.5 - 0.4) / 0.6
    assert np.array_equal(labels, np.where(position < crossing, 1, 2))
    assert labels[13] == 2  # at 4 1/3: nearest neighbour would give voxel 4's class, 1
