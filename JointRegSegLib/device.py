"""Choosing the torch device a run uses, with messages a user can act on."""

from __future__ import annotations

import torch

from .errors import InputError

CUDA_HELP = (
    "To use a GPU, install a CUDA build of torch (see README.md, 'GPU'); otherwise choose the CPU "
    "(--device cpu, or 'CPU' in the Slicer module)."
)


def available_devices() -> list[str]:
    """The devices torch can use here, CPU first (what the Slicer module offers)."""
    return ["cpu"] + [f"cuda:{i}" if torch.cuda.device_count() > 1 else "cuda" for i in range(torch.cuda.device_count())]


def resolve_device(name: str) -> torch.device:
    """Turn 'cpu', 'cuda', 'cuda:N' or 'auto' into a usable torch device, or raise InputError."""
    name = (name or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if ":" in name and not name.split(":", 1)[1].isdigit():
            raise InputError(f"unknown device '{name}': write cuda:N with N the GPU's number (cuda:0, cuda:1, ...).")
        if not torch.cuda.is_available():
            raise InputError(f"device '{name}' was requested but torch {torch.__version__} sees no CUDA GPU. {CUDA_HELP}")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"device '{name}' does not exist: torch sees {torch.cuda.device_count()} GPU(s).")
        return torch.device(name)
    raise InputError(f"unknown device '{name}': choose one of cpu, cuda, cuda:N or auto.")
