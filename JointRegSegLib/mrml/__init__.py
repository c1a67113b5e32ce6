"""JointRegSeg results in an MRML scene: the only part of JointRegSegLib that imports ``slicer``.

Works with the Slicer application's scene (``slicer.mrmlScene``) and with slicer-core's
(``pip install "trame-slicer[standalone]==2.0.0"``; see `core_scene`).
"""

from .colors import JACOBIAN_WINDOW, add_jacobian_table, add_label_table, add_pmm_table
from .load import FIXED_ROLE, KIND_ATTRIBUTE, MOVING_ROLE, LoadedResult, load_result, move_into_folder, read_manifest, read_volume, remove_node
from .table import add_metrics_table, table_as_dict
from .views import show_in_slice_views, show_table

__all__ = [
    "FIXED_ROLE",
    "JACOBIAN_WINDOW",
    "KIND_ATTRIBUTE",
    "MOVING_ROLE",
    "LoadedResult",
    "add_jacobian_table",
    "add_label_table",
    "add_metrics_table",
    "add_pmm_table",
    "load_result",
    "move_into_folder",
    "read_manifest",
    "read_volume",
    "remove_node",
    "show_in_slice_views",
    "show_table",
    "table_as_dict",
]
