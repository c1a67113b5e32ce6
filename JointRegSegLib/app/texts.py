"""Texts the views show: durations, the progress bar's label, what a method needs and gives, devices."""

from __future__ import annotations

import math
from typing import Optional

from ..methods.catalogue import MethodInfo


def format_duration(seconds: Optional[float]) -> str:
    """Seconds as a short human text ('45 s', '3 min 05 s', '1 h 02 min'); '' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_text(stage: str, seconds_left: Optional[float]) -> str:
    """The progress bar's text: stage, percentage (Qt fills in %p) and time left when known."""
    left = format_duration(seconds_left)
    text = f"{stage}: %p%" if stage else "%p%"
    return f"{text}, about {left} left" if left else text


def describe_method(info: MethodInfo) -> str:
    """One line telling what a method needs and gives."""
    needs = ["the moving image and an atlas (the shipped MNI152 atlas unless you choose one)"] if info.needs_atlas else [
        "the fixed and moving images"
    ]
    if info.needs_segmentations:
        needs.append("label maps or segmentations of both")
    gives = ["warped image", "transform", "Jacobian and PMM maps", "metrics"]
    if info.gives_affine:
        gives.insert(2, "affine part")
    if info.gives_segmentation:
        gives.append("segmentations")
    if info.gives_brain_mask:
        gives.append("brain mask")
    text = f"Needs {', '.join(needs)}. Gives {', '.join(gives)}."
    if info.supports_tto:
        text += " Adapts to the pair (iterations and time budget apply)."
    return text


def device_label(device: str) -> str:
    """A device as shown in the device list."""
    return "CPU" if device == "cpu" else f"GPU ({device})"
