"""The registry of methods. Each method lives in its own module and is imported only when used.

Importing this package imports neither torch nor numpy (the option schema in `options` and the
names below are read by panels at start-up); the protocol types load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ..errors import InputError

_MODULES: dict[str, str] = {
    "tto": "JointRegSegLib.methods.tto",
    "segreg": "JointRegSegLib.methods.segreg",
    "uresnet": "JointRegSegLib.methods.uresnet",
    "jers": "JointRegSegLib.methods.jers",
    "hof": "JointRegSegLib.methods.hof",
}
_PROTOCOL = ("Inputs", "Method", "MethodInfo", "Options", "ProgressCallback", "Result")


def method_names() -> list[str]:
    """Names of the methods this installation provides."""
    return sorted(_MODULES)


def get_method(name: str) -> Any:
    """The method called ``name`` (a module exposing ``METHOD``), or an InputError listing the choices."""
    if name not in _MODULES:
        raise InputError(f"unknown method '{name}'; choose one of: {', '.join(method_names())}.")
    return import_module(_MODULES[name]).METHOD


def __getattr__(name: str) -> Any:
    if name in _PROTOCOL:
        return getattr(import_module(".base", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_PROTOCOL, "get_method", "method_names"]
