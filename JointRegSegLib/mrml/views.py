"""Which volumes the slice views show (scene-level: the same in Slicer and in slicer-core)."""

from __future__ import annotations

import slicer


def show_in_slice_views(
    scene: slicer.vtkMRMLScene,
    background_id: str | None,
    foreground_id: str | None = None,
    opacity: float = 0.5,
    app_logic: slicer.vtkMRMLApplicationLogic | None = None,
) -> None:
    """Show ``background_id`` in every slice view with ``foreground_id`` over it at ``opacity``.

    Only the slice views' composite nodes change (they belong to the views, not to the data).
    With ``app_logic`` (``slicer.app.applicationLogic()`` in Slicer) the views are also fitted.
    """
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        composite.SetBackgroundVolumeID(background_id)
        composite.SetForegroundVolumeID(foreground_id)
        composite.SetForegroundOpacity(float(opacity) if foreground_id else 0.0)
    # Colour legends follow layer changes made through the GUI only: tell them about this one.
    for volume_id in (background_id, foreground_id):
        volume = scene.GetNodeByID(volume_id) if volume_id else None
        if volume is not None:
            for index in range(volume.GetNumberOfDisplayNodes()):
                display = volume.GetNthDisplayNode(index)
                if display is not None and display.IsA("vtkMRMLColorLegendDisplayNode"):
                    display.Modified()
    if app_logic is not None:
        app_logic.FitSliceToAll()


def show_table(app_logic: slicer.vtkMRMLApplicationLogic, table_id: str) -> None:
    """Make ``table_id`` the table that table views show."""
    app_logic.GetSelectionNode().SetActiveTableID(table_id)
    app_logic.PropagateTableSelection()
