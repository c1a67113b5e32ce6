"""The registry of methods. Each method lives in its own module and is imported only when used."""

from __future__ import annotations

from importlib import import_module

from ..errors import InputError
from .base import Inputs, Method, MethodInfo, Options, ProgressCallback, Result

_MODULES: dict[str, str] = {
    "tto": "JointRegSegLib.methods.tto",
    "segreg": "JointRegSegLib.methods.segreg",
    "uresnet": "JointRegSegLib.methods.uresnet",
    "jers": "JointRegSegLib.methods.jers",
    "hof": "JointRegSegLib.methods.hof",
}


def method_names() -> list[str]:
    """Names of the methods this installation provides."""
    return sorted(_MODULES)


def get_method(name: str) -> Method:
    """The method called ``name`` (a module exposing ``METHOD``), or an InputError listing the choices."""
    if name not in _MODULES:
        raise InputError(f"unknown method '{name}'; choose one of: {', '.join(method_names())}.")
    return import_module(_MODULES[name]).METHOD


__all__ = ["Inputs", "Method", "MethodInfo", "Options", "ProgressCallback", "Result", "get_method", "method_names"]
