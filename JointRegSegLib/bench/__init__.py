"""The benchmark: our methods and the established peers (ANTsPy, elastix, SimpleITK) on the same pairs.

``jointregseg bench`` (`command`) resolves the pairs (`pairs`), runs every tool in its own child
process with the same inputs and thread count (`runner`, `peers`), evaluates every result with the
worker's evaluation code, and writes one table set (`table`) and one figure set (`figures`).
Names are imported lazily so that ``jointregseg --help`` does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BenchSettings": "runner",
    "ToolRun": "runner",
    "run_benchmark": "runner",
    "PairSpec": "pairs",
    "SyntheticOptions": "pairs",
    "make_synthetic_set": "pairs",
    "read_pair_list": "pairs",
    "resolve_pairs": "pairs",
    "write_pair_list": "pairs",
    "PEERS": "peers",
    "run_peer": "peers",
    "write_tables": "table",
    "make_figures": "figures",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
