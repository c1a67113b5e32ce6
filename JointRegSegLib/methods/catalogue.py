"""What each method needs and gives, importable without torch, numpy, SimpleITK or nibabel.

The Slicer module, the web page and the command line list the methods and check a user's inputs
from this catalogue alone, so Slicer can show the methods before anything is installed; only
`get_method` (in this package) imports a method's numerical code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class MethodInfo:
    """What a method needs and gives (shown to users in the CLI help, the Slicer module and the web page)."""

    name: str
    title: str
    description: str
    paper: str
    needs_segmentations: bool = False
    needs_atlas: bool = False
    gives_segmentation: bool = False
    gives_brain_mask: bool = False
    gives_affine: bool = False
    supports_tto: bool = False
    trainable: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CATALOGUE: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo(
            name="hof",
            title="Hierarchical bi-level joint registration and few-shot segmentation (HOF)",
            description=(
                "A shared encoder with a registration decoder and a segmentation decoder, trained together as a "
                "leader-follower (bi-level) problem from a few labelled and many unlabelled brain MRI. Needs only the "
                "two images; gives the deformation, the warped image and a segmentation of each image (28 brain "
                "structures, FreeSurfer codes)."
            ),
            paper="Hierarchical Optimization Framework (HOF): bi-level joint registration and few-shot segmentation",
            gives_segmentation=True,
            gives_affine=True,
        ),
        MethodInfo(
            name="jers",
            title="Joint extraction, registration and segmentation (one-shot, atlas)",
            description=(
                "Strips the skull from a raw head scan, aligns the brain affinely to a labelled atlas and segments "
                "it in the scan's own space, all with networks trained from one atlas. Moving: the raw scan; fixed: "
                "the atlas (default: the shipped MNI152 atlas with CSF / grey / white matter labels). Gives the "
                "brain mask, the extracted image, the affine and a tissue segmentation."
            ),
            paper="Su et al., One-shot Joint Extraction, Registration and Segmentation of Neuroimaging Data",
            needs_atlas=True,
            gives_segmentation=True,
            gives_brain_mask=True,
            gives_affine=True,
        ),
        MethodInfo(
            name="segreg",
            title="SegReg: segmentation-driven registration",
            description=(
                "Registers each segmented region separately and composes the region fields, so the deformation "
                "may slide at region borders. Needs label maps of both images (FreeSurfer codes, or matching "
                "codes). Variants: iterative (no training) or learned (shared U-Net)."
            ),
            paper="Chen et al., Ideal Registration? Segmentation is All You Need",
            needs_segmentations=True,
            gives_affine=True,
        ),
        MethodInfo(
            name="tto",
            title="Generalised registration with test-time optimisation",
            description=(
                "A U-Net pretrained on synthetic images only (any contrast) predicts a deformation after an "
                "affine stage, then adapts itself to the pair for up to 100 steps or one minute. Needs only "
                "the two images; gives the affine and the deformable transform."
            ),
            paper="Sneha Sree C et al., Test Time Optimized Generalized AI-based Medical Image Registration Method",
            gives_affine=True,
            supports_tto=True,
        ),
        MethodInfo(
            name="uresnet",
            title="U-ReSNet: joint affine + deformable registration and segmentation",
            description=(
                "One light network (about 270 000 parameters) predicts, in a second, an affine and a deformable "
                "transform and segments the moving image (cerebral white matter, cortex and lateral ventricles). "
                "Needs only the two images; option segment_fixed=true also segments the fixed image."
            ),
            paper="Estienne et al., U-ReSNet: Ultimate Coupling of Registration and Segmentation with Deep Nets",
            gives_segmentation=True,
            gives_affine=True,
        ),
    )
}


def method_names() -> list[str]:
    """Names of the methods this installation provides."""
    return sorted(CATALOGUE)


def method_info(name: str) -> MethodInfo:
    """The catalogue entry of ``name`` (KeyError for an unknown name; `get_method` gives the user's message)."""
    return CATALOGUE[name]
