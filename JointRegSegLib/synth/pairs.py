"""Synthetic registration pairs generated on the fly (SynthMorph recipe, Hoffmann et al. 2022).

One label map ``L`` per pair (a SynthSeg map drawn at random, or a fresh smooth-noise map) is
deformed twice, by independent random diffeomorphisms ``phi_f`` and ``phi_m`` (`deform`):
``L_f = L o phi_f`` and ``L_m = L o phi_m`` (nearest-neighbour, border padding), and each is
rendered with its own random contrast (`render`). The displacement that registers the pair,
``phi_m^-1 o phi_f``, is returned as ``true_disp``: ``warp(moving, true_disp) ~ fixed``.

Randomness comes from one ``torch.Generator`` on the requested device, seeded with ``seed``: the
same seed and device give the same sequence of batches (CPU and CUDA sequences differ).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import spatial
from ..errors import InputError
from .deform import DeformationOptions, random_deformation
from .labelmaps import load_synthseg_maps, smooth_noise_labelmap
from .render import RenderOptions, render_image


class SyntheticPairs:
    """Endless source of synthetic pairs on a network grid of size ``shape``.

    Args:
        source: ``"noise"`` (smooth-noise label maps with ``n_labels`` labels), a folder of label
            maps (read with `load_synthseg_maps` at ``shape``; ``labelmap_kwargs`` go to it), or
            label maps ``(N, I, J, K)`` (numpy or torch integers) already on the grid.
        shape: grid size (I, J, K).
        seed: seed of the generator.
        device: torch device of the generator and of the tensors produced.
        batch_size: default batch size of `sample` and of iteration.
        deformation: random deformation of each image (`DeformationOptions`).
        render: contrast model (`RenderOptions`).
        n_labels: number of labels of the smooth-noise maps.
        noise_resolution: control-grid fraction of the smooth-noise maps.
        labelmap_kwargs: options of `load_synthseg_maps` (spacing, drop_extracerebral, ...).
    """

    def __init__(
        self,
        source: str | Path | np.ndarray | torch.Tensor,
        shape: Sequence[int],
        seed: int = 0,
        device: str | torch.device = "cpu",
        batch_size: int = 1,
        deformation: DeformationOptions = DeformationOptions(),
        render: RenderOptions = RenderOptions(),
        n_labels: int = 26,
        noise_resolution: float = 1.0 / 8.0,
        labelmap_kwargs: dict | None = None,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 2:
            raise InputError(f"shape must be a 3D grid size (I, J, K); got {self.shape}")
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.batch_size = int(batch_size)
        self.deformation = deformation
        self.render = render
        self.n_labels = int(n_labels)
        self.noise_resolution = float(noise_resolution)
        self.maps = self._label_maps(source, labelmap_kwargs or {})

    def _label_maps(self, source, labelmap_kwargs: dict) -> torch.Tensor | None:
        if isinstance(source, str) and source == "noise":
            return None
        if isinstance(source, (str, Path)):
            maps = load_synthseg_maps(source, self.shape, **labelmap_kwargs)
        else:
            maps = source
        maps = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(np.array(maps))
        if maps.is_floating_point() or maps.ndim != 4 or tuple(maps.shape[1:]) != self.shape:
            raise InputError(
                f"label maps must be integers shaped (N, {', '.join(map(str, self.shape))}); "
                f"got {maps.dtype} {tuple(maps.shape)}"
            )
        if maps.shape[0] < 1 or maps.min() < 0:
            raise InputError("need at least one label map with non-negative codes")
        return maps.to(self.device, torch.int16)

    def _source_labels(self, batch_size: int) -> torch.Tensor:
        if self.maps is None:
            return smooth_noise_labelmap(
                self.shape, self.n_labels, self.generator, batch_size, self.noise_resolution
            )
        index = torch.randint(self.maps.shape[0], (batch_size,), generator=self.generator, device=self.device)
        return self.maps[index, None].long()

    def sample(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """One batch: ``fixed``, ``moving`` float ``(B, 1, I, J, K)`` in [0, 1], ``fixed_labels``,
        ``moving_labels`` int64 ``(B, 1, I, J, K)``, and ``true_disp`` float ``(B, 3, I, J, K)``."""
        batch_size = self.batch_size if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1; got {batch_size}")
        labels = self._source_labels(batch_size).float()
        fixed_disp = random_deformation(self.shape, self.generator, batch_size, self.deformation)
        moving_disp, moving_inverse = random_deformation(
            self.shape, self.generator, batch_size, self.deformation, return_inverse=True
        )
        fixed_labels = spatial.warp(labels, fixed_disp, mode="nearest", padding_mode="border").round().long()
        moving_labels = spatial.warp(labels, moving_disp, mode="nearest", padding_mode="border").round().long()
        return {
            "fixed": render_image(fixed_labels, self.generator, self.render),
            "moving": render_image(moving_labels, self.generator, self.render),
            "fixed_labels": fixed_labels,
            "moving_labels": moving_labels,
            "true_disp": spatial.compose(moving_inverse, fixed_disp),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.sample()
