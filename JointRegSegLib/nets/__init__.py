"""Neural network architectures (PyTorch) shared by the methods."""

from .blocks import ConvBlock, FlowHead, UpBlock, count_parameters
from .unet import RegistrationUNet, student_unet, teacher_unet

__all__ = [
    "ConvBlock",
    "FlowHead",
    "RegistrationUNet",
    "UpBlock",
    "count_parameters",
    "student_unet",
    "teacher_unet",
]
