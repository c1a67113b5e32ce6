"""JointRegSeg core library: joint registration and segmentation methods for 3D medical images."""

__version__ = "0.1.0"
