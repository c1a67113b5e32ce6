"""A headless MRML scene set up like Slicer's (slicer-core): for tests, scripts and screenshots.

Inside the Slicer application use ``slicer.mrmlScene`` instead; this only recreates the pieces
Slicer's application would: application logic, the colour logic with Slicer's default colour
tables (registered as the "Colors" module logic), the colour-legend node class that Slicer's Colors
module registers, and the volumes, segmentations and subject-hierarchy logics (the last gives every
data node a subject-hierarchy item, as in Slicer).
"""

from __future__ import annotations

from dataclasses import dataclass

import slicer


@dataclass
class CoreScene:
    scene: slicer.vtkMRMLScene
    app_logic: slicer.vtkSlicerApplicationLogic
    color_logic: slicer.vtkMRMLColorLogic
    volumes_logic: slicer.vtkSlicerVolumesLogic
    segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic
    subject_hierarchy_logic: slicer.vtkSlicerSubjectHierarchyModuleLogic


def core_scene() -> CoreScene:
    """A new scene with application, colour, volumes, segmentations and subject-hierarchy logics bound to it."""
    scene = slicer.vtkMRMLScene()
    register_node_classes(scene)
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", color_logic)
    volumes_logic = slicer.vtkSlicerVolumesLogic()
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    subject_hierarchy_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    logics = (("Volumes", volumes_logic), ("Segmentations", segmentations_logic), ("SubjectHierarchy", subject_hierarchy_logic))
    for name, logic in logics:
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
    return CoreScene(scene, app_logic, color_logic, volumes_logic, segmentations_logic, subject_hierarchy_logic)


def register_node_classes(scene: slicer.vtkMRMLScene) -> None:
    """Register node classes that Slicer's modules (not MRML core) register: the colour legend."""
    if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
        scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
