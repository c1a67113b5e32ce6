"""The registry of methods. Each method lives in its own module and is imported only when used.

Importing this package loads only the catalogue (no torch, numpy, SimpleITK or nibabel), so the
Slicer module can list the methods before anything is installed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from ..errors import InputError
from .catalogue import CATALOGUE, MethodInfo, method_info, method_names

if TYPE_CHECKING:
    from .base import Method


def get_method(name: str) -> Method:
    """The method called ``name`` (its module's ``METHOD``), or an InputError listing the choices."""
    if name not in CATALOGUE:
        raise InputError(f"unknown method '{name}'; choose one of: {', '.join(method_names())}.")
    return import_module(f"{__name__}.{name}").METHOD


__all__ = ["CATALOGUE", "MethodInfo", "get_method", "method_info", "method_names"]
