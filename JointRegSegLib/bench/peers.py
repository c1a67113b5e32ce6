"""Established registration tools ("peers"), each wrapped to return a displacement field in our convention.

Every peer reads the same staged NIfTI files as our methods and returns a SimpleITK vector image on
the fixed image's grid holding LPS mm displacements: the fixed point ``x`` maps to ``x + u(x)`` in
the moving image (ITK's ``DisplacementFieldTransform``, `JointRegSegLib.spatial.physical`). The
wrappers also return the tool's own warped moving image, so a test can check that our reading of
each field reproduces what the tool itself produced.

Peers run in a child process (``python -m JointRegSegLib.bench.peers JOB.json``, started by
`JointRegSegLib.bench.runner`) so that each gets a clean peak-memory figure and its own thread
settings, and so that a peer may live in another Python environment (antspyx pins numpy < 2.4).
This module therefore needs only numpy and SimpleITK, loaded on first use (the command line reads
the peers' names from here without them); each tool is imported inside its wrapper, and nothing
here imports torch.

Settings (``preset``):

- ``default``: each tool's own defaults, as a user who installs it would run it:
  ANTsPy ``registration(type_of_transform="SyN")`` (centre-of-mass initialisation, Mattes MI affine
  stage, then SyN with Mattes MI, ``reg_iterations=(40, 20, 0)``) or ``"SyNOnly"`` (the same SyN
  stage from the identity, no affine stage); elastix with its default ``affine`` then ``bspline``
  parameter maps (4 resolutions, 256 iterations each, Mattes MI, 10 mm final B-spline grid,
  bending-energy penalty); SimpleITK has no ready-made demons pipeline, so ``demons`` is ours:
  a Mattes MI affine stage (moments initialisation, three levels) followed by multi-resolution
  fast symmetric forces demons (three levels) on histogram-matched intensities.
- ``fast``: the same pipelines with few iterations, for tests on tiny images.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def _on_first_use(name: str) -> Any:
    """Module ``name``, executed when one of its attributes is first read (``importlib.util.LazyLoader``)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


np = _on_first_use("numpy")
sitk = _on_first_use("SimpleITK")

PRESETS = ("default", "fast")
FIELD_FILE = "displacement.nii.gz"
OWN_WARPED_FILE = "own_warped.nii.gz"
REPORT_FILE = "peer.json"


@dataclass(frozen=True)
class Peer:
    """A peer tool: its name, what it runs, the Python module it needs and how to install it."""

    name: str
    title: str
    module: str
    install: str
    description: str


PEERS: dict[str, Peer] = {
    "ants-syn": Peer(
        "ants-syn",
        "ANTsPy SyN (own affine stage)",
        "ants",
        "pip install antspyx  (or: pip install .[peers])",
        "ants.registration type_of_transform='SyN': affine (Mattes MI) then SyN (Mattes MI)",
    ),
    "ants-synonly": Peer(
        "ants-synonly",
        "ANTsPy SyN (no affine stage)",
        "ants",
        "pip install antspyx  (or: pip install .[peers])",
        "ants.registration type_of_transform='SyNOnly': SyN (Mattes MI) from the identity",
    ),
    "elastix": Peer(
        "elastix",
        "elastix affine + B-spline",
        "itk",
        "pip install itk-elastix  (or: pip install .[peers])",
        "itk-elastix with the default 'affine' and 'bspline' parameter maps",
    ),
    "demons": Peer(
        "demons",
        "SimpleITK affine + fast symmetric demons",
        "SimpleITK",
        "pip install SimpleITK",
        "SimpleITK Mattes MI affine, then multi-resolution FastSymmetricForcesDemons",
    ),
}

# A peer is "installed" when the peer's Python finds this module (found, not imported: importing
# itk's elastix modules alone takes seconds; a broken installation shows up as a failed run instead).
TOOL_MODULES = {"ants": "ants", "itk": "itk.ElastixPython", "SimpleITK": "SimpleITK"}


@dataclass
class PeerOutput:
    """A peer's result: the field (vector image on the fixed grid), its own warped image, what it ran."""

    field: sitk.Image
    own_warped: sitk.Image | None
    settings: dict[str, Any] = field(default_factory=dict)
    version: str = ""


@dataclass
class Loaded:
    """A pair read by a tool's own reader (tool images), with the fixed image's grid as SimpleITK sees it."""

    fixed: Any
    moving: Any
    reference: sitk.Image


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown peer preset '{preset}'; choose one of: {', '.join(PRESETS)}")


def _check_on_fixed_grid(image: sitk.Image, fixed: sitk.Image, what: str) -> None:
    same = (
        image.GetSize() == fixed.GetSize()
        and np.allclose(image.GetSpacing(), fixed.GetSpacing(), atol=1e-4)
        and np.allclose(image.GetOrigin(), fixed.GetOrigin(), atol=1e-3)
        and np.allclose(image.GetDirection(), fixed.GetDirection(), atol=1e-5)
    )
    if not same:
        raise RuntimeError(f"{what} is not on the fixed image's grid")


def _vector_field(image: sitk.Image, fixed: sitk.Image, what: str) -> sitk.Image:
    """A float64 vector image on the fixed grid (the type SimpleITK's field transforms take)."""
    _check_on_fixed_grid(image, fixed, what)
    if image.GetNumberOfComponentsPerPixel() != 3:
        raise RuntimeError(f"{what} has {image.GetNumberOfComponentsPerPixel()} components, expected 3")
    return sitk.Cast(image, sitk.sitkVectorFloat64)


# ---------------------------------------------------------------- ANTsPy


def _load_ants(fixed_path: Path, moving_path: Path) -> Loaded:
    import ants

    return Loaded(
        ants.image_read(str(fixed_path), pixeltype="float"),
        ants.image_read(str(moving_path), pixeltype="float"),
        sitk.ReadImage(str(fixed_path), sitk.sitkFloat32),
    )


def _ants(pair: Loaded, preset: str, threads: int, seed: int, own: bool, affine_stage: bool) -> PeerOutput:
    import ants

    # ANTs reads its seed from the environment; ANTsPy runs still differ slightly from run to run
    # (seen here even with one thread), so ANTs numbers are not bit-reproducible.
    os.environ["ANTS_RANDOM_SEED"] = str(int(seed))
    settings: dict[str, Any] = {"type_of_transform": "SyN" if affine_stage else "SyNOnly"}
    if preset == "fast":
        settings["reg_iterations"] = (10, 5)
    with tempfile.TemporaryDirectory(prefix="jrs_ants_") as work:
        registration = ants.registration(pair.fixed, pair.moving, outprefix=str(Path(work) / "reg_"), **settings)
        composed = ants.apply_transforms(
            pair.fixed, pair.moving, registration["fwdtransforms"], compose=str(Path(work) / "field_")
        )
        field_image = _vector_field(sitk.ReadImage(composed), pair.reference, "the ANTs composed field")
        own_warped = None
        if own:
            registration["warpedmovout"].to_file(str(Path(work) / "warped.nii.gz"))
            own_warped = sitk.ReadImage(str(Path(work) / "warped.nii.gz"))
    settings["field"] = "fwdtransforms composed by antsApplyTransforms (compose=...)"
    return PeerOutput(field_image, own_warped, _plain(settings), f"antspyx {ants.__version__}")


# ---------------------------------------------------------------- elastix


def _load_elastix(fixed_path: Path, moving_path: Path) -> Loaded:
    import itk

    itk.ParameterObject.New()  # loads elastix's ITK modules (seconds) before the clock starts
    return Loaded(
        itk.imread(str(fixed_path), itk.F), itk.imread(str(moving_path), itk.F), sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    )


def _elastix(pair: Loaded, preset: str, threads: int, seed: int, own: bool) -> PeerOutput:
    import itk

    parameters = itk.ParameterObject.New()
    for name in ("affine", "bspline"):
        parameter_map = parameters.GetDefaultParameterMap(name)
        parameter_map["RandomSeed"] = [str(int(seed))]
        if preset == "fast":
            parameter_map["NumberOfResolutions"] = ["1"]
            parameter_map["MaximumNumberOfIterations"] = ["16"]
            parameter_map["ASGDParameterEstimationMethod"] = ["DisplacementDistribution"]
            if name == "bspline":
                parameter_map["GridSpacingSchedule"] = ["1"]
                parameter_map["FinalGridSpacingInPhysicalUnits"] = ["20"]
        parameters.AddParameterMap(parameter_map)
    # Threads through ITK's global default: elastix's own number_of_threads > 1 crashes multi-metric
    # (B-spline + bending energy) registrations (InsightSoftwareConsortium/ITKElastix issues 160, 295).
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    _, transform = itk.elastix_registration_method(pair.fixed, pair.moving, parameter_object=parameters, log_to_console=False)
    deformation = itk.transformix_deformation_field(pair.moving, transform)
    field_image = _vector_field(_itk_to_sitk(itk, deformation, vector=True), pair.reference, "the elastix deformation field")
    own_warped = None
    if own:
        # elastix's result image is cubic B-spline resampled; the reference for our (linear) reading
        # of the field is the same transform applied by transformix with linear interpolation.
        for i in range(transform.GetNumberOfParameterMaps()):
            transform.SetParameter(i, "ResampleInterpolator", "FinalLinearInterpolator")
        own_warped = _itk_to_sitk(itk, itk.transformix_filter(pair.moving, transform), vector=False)
    settings = {
        "parameter_maps": [
            {key: list(value) for key, value in dict(parameters.GetParameterMap(i)).items()}
            for i in range(parameters.GetNumberOfParameterMaps())
        ]
    }
    version = f"itk-elastix (ITK {itk.Version.GetITKVersion()})"
    return PeerOutput(field_image, own_warped, settings, version)


def _itk_to_sitk(itk: Any, image: Any, vector: bool) -> sitk.Image:
    """An ITK Python image as a SimpleITK image with the same grid (both index arrays as (k, j, i))."""
    array = itk.array_from_image(image)
    out = sitk.GetImageFromArray(np.asarray(array, dtype=np.float64 if vector else np.float32), isVector=vector)
    out.SetSpacing(tuple(float(s) for s in image.GetSpacing()))
    out.SetOrigin(tuple(float(o) for o in image.GetOrigin()))
    out.SetDirection(tuple(float(d) for d in np.asarray(itk.array_from_matrix(image.GetDirection())).ravel()))
    return out


# ---------------------------------------------------------------- SimpleITK demons

DEMONS = {
    "default": {
        "affine_shrink": (4, 2, 1),
        "affine_sigma_vox": (2.0, 1.0, 0.0),
        "affine_iterations": 100,
        "demons_shrink": (4, 2, 1),
        "demons_iterations": (100, 50, 25),
        "demons_field_sigma_vox": 1.5,
    },
    "fast": {
        "affine_shrink": (2, 1),
        "affine_sigma_vox": (1.0, 0.0),
        "affine_iterations": 30,
        "demons_shrink": (2, 1),
        "demons_iterations": (20, 10),
        "demons_field_sigma_vox": 1.5,
    },
}


def _sitk_affine(fixed: sitk.Image, moving: sitk.Image, settings: dict[str, Any], seed: int) -> sitk.Transform:
    """Mattes MI affine registration (moments initialisation, gradient descent with physical-shift scales)."""
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, int(seed))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsGradientDescent(
        learningRate=1.0, numberOfIterations=int(settings["affine_iterations"]), estimateLearningRate=method.EachIteration
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(settings["affine_shrink"]))
    method.SetSmoothingSigmasPerLevel(list(settings["affine_sigma_vox"]))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


def _level_grid(fixed: sitk.Image, shrink: int) -> sitk.Image:
    """An empty image over the fixed image's extent with ``shrink`` times its spacing."""
    size = [max(1, int(round(n / shrink))) for n in fixed.GetSize()]
    spacing = [s * n / m for s, n, m in zip(fixed.GetSpacing(), fixed.GetSize(), size)]
    direction = np.array(fixed.GetDirection()).reshape(3, 3)
    # Keep the physical centre: the first voxel centre moves by half the change of spacing.
    offset = direction @ ((np.array(spacing) - np.array(fixed.GetSpacing())) / 2.0)
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin(tuple(np.array(fixed.GetOrigin()) + offset))
    grid.SetDirection(fixed.GetDirection())
    return grid


def _load_sitk(fixed_path: Path, moving_path: Path) -> Loaded:
    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    return Loaded(fixed, sitk.ReadImage(str(moving_path), sitk.sitkFloat32), fixed)


def _demons(pair: Loaded, preset: str, threads: int, seed: int, own: bool) -> PeerOutput:
    settings = dict(DEMONS[preset])
    fixed, moving = pair.fixed, pair.moving
    affine = _sitk_affine(fixed, moving, settings, seed)
    moving_on_fixed = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0)
    matcher = sitk.HistogramMatchingImageFilter()
    matcher.SetNumberOfHistogramLevels(1024)
    matcher.SetNumberOfMatchPoints(7)
    matcher.ThresholdAtMeanIntensityOn()
    matched = matcher.Execute(moving_on_fixed, fixed)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetStandardDeviations(float(settings["demons_field_sigma_vox"]))
    displacement = None
    for shrink, iterations in zip(settings["demons_shrink"], settings["demons_iterations"]):
        grid = _level_grid(fixed, shrink) if shrink > 1 else fixed
        sigma = 0.5 * (shrink - 1) * min(fixed.GetSpacing())

        def level(image: sitk.Image) -> sitk.Image:
            smooth = sitk.SmoothingRecursiveGaussian(image, sigma) if sigma > 0 else image
            return sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, 0.0)

        if displacement is None:
            initial = sitk.Image(grid.GetSize(), sitk.sitkVectorFloat64)
            initial.CopyInformation(grid)
        else:
            initial = sitk.Resample(displacement, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        demons.SetNumberOfIterations(int(iterations))
        displacement = demons.Execute(level(fixed), level(matched), initial)
    # The whole map: the demons field acts first, then the affine (ITK composites apply the last added first).
    composite = sitk.CompositeTransform(affine)
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64)))
    field_image = sitk.TransformToDisplacementField(
        composite, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection()
    )
    own_warped = sitk.Resample(moving, fixed, composite, sitk.sitkLinear, 0.0) if own else None
    return PeerOutput(field_image, own_warped, _plain(settings), f"SimpleITK {sitk.Version.VersionString()}")


# ---------------------------------------------------------------- dispatch and the child process

# name -> (read the pair with the tool's own reader, register it)
_TOOLS: dict[str, tuple[Callable[[Path, Path], Loaded], Callable[..., PeerOutput]]] = {
    "ants-syn": (_load_ants, lambda pair, *args: _ants(pair, *args, affine_stage=True)),
    "ants-synonly": (_load_ants, lambda pair, *args: _ants(pair, *args, affine_stage=False)),
    "elastix": (_load_elastix, _elastix),
    "demons": (_load_sitk, _demons),
}


def load_pair(name: str, fixed: Path, moving: Path) -> Loaded:
    """Read a pair with peer ``name``'s own reader (this also loads the tool's libraries)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer '{name}'; choose one of: {', '.join(PEERS)}")
    return _TOOLS[name][0](Path(fixed), Path(moving))


def register_pair(
    name: str, pair: Loaded, preset: str = "default", threads: int = 1, seed: int = 0, own_warped: bool = False
) -> PeerOutput:
    """Register a loaded pair with peer ``name``; the field lies on the fixed grid.

    ``own_warped`` also returns the tool's own warped moving image (the reference our reading of
    the field is checked against).
    """
    _check_preset(preset)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    return _TOOLS[name][1](pair, preset, int(threads), int(seed), bool(own_warped))


def run_peer(
    name: str, fixed: Path, moving: Path, preset: str = "default", threads: int = 1, seed: int = 0, own_warped: bool = False
) -> PeerOutput:
    """Register ``moving`` onto ``fixed`` (image files) with peer ``name``: `load_pair`, then `register_pair`."""
    return register_pair(name, load_pair(name, fixed, moving), preset, threads, seed, own_warped)


def _plain(value: Any) -> Any:
    """JSON-ready settings (tuples as lists, numpy numbers as Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def main(job_path: str) -> int:
    """Child-process entry: run the peer a job file names, write the field, own warped image and a report.

    The job (JSON) has ``peer``, ``fixed``, ``moving``, ``out``, ``preset``, ``threads``, ``seed`` and
    ``own_warped`` (write the tool's own warped image). The report holds ``register_s``: seconds from
    the tool's call to a dense field on the fixed grid (loading the tool's libraries, reading the
    images and writing files excluded).
    """
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    pair = load_pair(job["peer"], Path(job["fixed"]), Path(job["moving"]))
    start = time.perf_counter()
    result = register_pair(job["peer"], pair, job["preset"], job["threads"], job["seed"], job.get("own_warped", False))
    register_s = time.perf_counter() - start
    sitk.WriteImage(sitk.Cast(result.field, sitk.sitkVectorFloat32), str(out / FIELD_FILE), useCompression=True)
    if result.own_warped is not None:
        sitk.WriteImage(sitk.Cast(result.own_warped, sitk.sitkFloat32), str(out / OWN_WARPED_FILE), useCompression=True)
    report = {
        "peer": job["peer"],
        "register_s": register_s,
        "version": result.version,
        "settings": result.settings,
        "threads": job["threads"],
        "itk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "python": sys.executable,
        "pid": os.getpid(),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
