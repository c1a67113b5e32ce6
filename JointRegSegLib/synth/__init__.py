"""Synthetic training data (SynthMorph recipe): label maps, random deformations, random contrasts, pairs."""

from .deform import AffineRanges, DeformationOptions, random_deformation, random_velocity, smooth_noise
from .labelmaps import load_synthseg_maps, smooth_noise_labelmap
from .pairs import SyntheticPairs
from .render import RenderOptions, gaussian_blur, render_image

__all__ = [
    "AffineRanges",
    "DeformationOptions",
    "RenderOptions",
    "SyntheticPairs",
    "gaussian_blur",
    "load_synthseg_maps",
    "random_deformation",
    "random_velocity",
    "render_image",
    "smooth_noise",
    "smooth_noise_labelmap",
]
