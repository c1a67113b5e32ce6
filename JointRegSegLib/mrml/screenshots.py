"""Render the extension's screenshots from a real scene with slicer-core's offscreen slice views.

``python -m JointRegSegLib.mrml.screenshots [--result DIR] [--out Screenshots]`` registers the
bundled sample pair with the worker (unless ``--result`` names a finished output folder), loads
the result with `load_result` into a trame-slicer ``SlicerApp`` scene and renders its axial,
coronal and sagittal slice views offscreen (EGL/OSMesa, no display needed) into two PNGs:

- ``warped_overlay.png``: the fixed image with the warped moving image over it at 50 %, in red;
- ``jacobian_overlay.png``: the fixed image with the Jacobian-determinant map over it at 50 %.

With ``--icon PATH`` it also writes the module icon (128 x 128, the middle view of the Jacobian overlay).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..sample_data import sample_pair
from .core import register_node_classes
from .load import LoadedResult, load_result
from .views import show_in_slice_views

VIEW_SIZE = 400
ICON_SIZE = 128
OVERLAY_OPACITY = 0.5
WARPED_COLORS = "vtkMRMLColorTableNodeRed"


def run_sample_registration(output: Path, iterations: int | None = None) -> Path:
    """Register the bundled sample pair with the worker (method tto) into ``output``."""
    job = {"method": "tto", "output": str(output), **{k: str(v) for k, v in sample_pair().items()}, "pictures": False}
    if iterations is not None:
        job["iterations"] = iterations
    job_file = output.parent / "job.json"
    job_file.write_text(json.dumps(job))
    process = subprocess.run([sys.executable, "-m", "JointRegSegLib.worker", str(job_file)], capture_output=True, text=True)
    if process.returncode != 0:
        errors = [json.loads(line) for line in process.stdout.splitlines() if '"error"' in line]
        raise InputError(f"the sample registration failed: {errors[-1]['message'] if errors else process.stderr[-2000:]}")
    return output


class OffscreenViews:
    """A slicer-core scene with axial, coronal and sagittal slice views rendered offscreen."""

    def __init__(self, size: int = VIEW_SIZE) -> None:
        from trame_slicer.core import SlicerApp
        from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

        self.app = SlicerApp()
        register_node_classes(self.app.scene)
        self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        definitions = (ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view())
        self.views = [self.app.view_manager.create_view(d) for d in definitions]
        for view in self.views:
            view.render_window().SetSize(size, size)

    @property
    def scene(self):
        return self.app.scene

    def load_volume(self, path: Path, name: str):
        node = self.app.volumes_logic.AddArchetypeVolume(str(path), name)
        if node is None:
            raise InputError(f"slicer-core could not read {path}.")
        return node

    def render(self, background_id: str, foreground_id: str | None, opacity: float = OVERLAY_OPACITY) -> np.ndarray:
        """The three views side by side as an (H, 3W, 3) uint8 RGB array."""
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        show_in_slice_views(self.scene, background_id, foreground_id, opacity)
        images = []
        for view in self.views:
            view.fit_view_to_content()
            view.render()
            grab = vtk.vtkWindowToImageFilter()
            grab.SetInput(view.render_window())
            grab.ReadFrontBufferOff()
            grab.Update()
            image = grab.GetOutput()
            width, height, _ = image.GetDimensions()
            pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
            images.append(pixels[::-1, :, :3])
        return np.concatenate(images, axis=1)


def render_screenshots(result_folder: Path, out: Path, icon: Path | None = None) -> dict[str, Path]:
    """Write warped_overlay.png and jacobian_overlay.png (and the icon) for a worker output of the sample pair."""
    from PIL import Image

    pair = sample_pair()
    views = OffscreenViews()
    fixed = views.load_volume(pair["fixed"], "fixed")
    moving = views.load_volume(pair["moving"], "moving")
    loaded: LoadedResult = load_result(views.scene, result_folder, fixed, moving)
    for segmentation_id in loaded.segmentations.values():
        views.scene.GetNodeByID(segmentation_id).GetDisplayNode().SetVisibility(False)
    warped = views.scene.GetNodeByID(loaded.warped)
    warped.GetDisplayNode().SetAndObserveColorNodeID(WARPED_COLORS)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, foreground in (("warped_overlay", loaded.warped), ("jacobian_overlay", loaded.jacobian)):
        path = out / f"{name}.png"
        pixels = views.render(fixed.GetID(), foreground)
        Image.fromarray(pixels).save(path)
        written[name] = path
    if icon is not None:
        legends = views.scene.GetNodesByClass("vtkMRMLColorLegendDisplayNode")
        for index in range(legends.GetNumberOfItems()):
            legends.GetItemAsObject(index).SetVisibility(False)
        middle = views.render(fixed.GetID(), loaded.jacobian)[:, VIEW_SIZE : 2 * VIEW_SIZE]
        Image.fromarray(middle).resize((ICON_SIZE, ICON_SIZE), Image.LANCZOS).save(icon)
        written["icon"] = icon
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", type=Path, help="a finished worker output folder of the sample pair")
    parser.add_argument("--out", type=Path, default=Path("Screenshots"), help="where to write the PNGs")
    parser.add_argument("--iterations", type=int, help="TTO iterations when registering the sample pair here")
    parser.add_argument("--icon", type=Path, help="also write the module icon (PNG) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="jointregseg-screenshots-") as tmp:
        result = args.result or run_sample_registration(Path(tmp) / "result", args.iterations)
        for path in render_screenshots(result, args.out, args.icon).values():
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
