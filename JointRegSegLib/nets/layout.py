"""The CPU's fast path for the networks' 3D convolutions: oneDNN (mkldnn) kernels in the channels-last layout.

PyTorch (2.13, aten/src/ATen/native/Convolution.cpp, ``ConvParams::use_mkldnn``) sends a CPU float convolution to
oneDNN only when its batch holds more than one item or ``N * C * D * H`` exceeds 20480; every other one goes to its
reference kernel (``aten::slow_conv3d``), several times slower. At inference a batch holds one volume or a few small
crops, so most of the first and last layers of every network took that path: jers' five calls of its networks spent
185 ms there, segreg's learned crops 404 ms. `Conv3d` calls oneDNN's convolution for every CPU float32 input
(measured on 2 threads: a 2 -> 8 channel layer on 80 x 112 x 96 voxels 94 -> 36 ms, 8 -> 16 channels on 40 x 56 x 48
50 -> 4 ms), and oneDNN works on the channels-last layout without reordering each call's input and weights
(segreg's network on its largest crop 0.50 -> 0.22 s with both). Its values equal PyTorch's within float rounding
(relative 1e-6); it is the kernel training already ran (batches of two or more, `fast_layout`). On a GPU, in another
precision or without oneDNN, `Conv3d` is ``nn.Conv3d``. A network's last layer is a `Head`, so that what a network
returns is in PyTorch's standard layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout the networks run fastest in on ``device``: channels-last on the CPU (module docstring)."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def fast_layout(value: Any, device: torch.device) -> Any:
    """``value`` (a network, a tensor, or a dict / list of them) on ``device``, 5D floating-point tensors and the
    network in `memory_format`; other values unchanged."""
    layout = memory_format(device)
    if isinstance(value, nn.Module):
        return value.to(device=device, memory_format=layout)
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        return value.contiguous(memory_format=layout) if value.ndim == 5 and value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: fast_layout(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(fast_layout(v, device) for v in value)
    return value


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` whose CPU float32 convolutions run on oneDNN in the channels-last layout (module docstring);
    its input and weights are brought into that layout (a no-op for a network and activations already in it), and
    its output is channels-last. The same parameters and state dict as ``nn.Conv3d``."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not _on_onednn(input, self.padding_mode, self.padding):
            return super()._conv_forward(input, weight, bias)
        layout = torch.channels_last_3d
        return torch.mkldnn_convolution(
            input.contiguous(memory_format=layout), weight.contiguous(memory_format=layout), bias,
            self.padding, self.stride, self.dilation, self.groups,
        )


def _on_onednn(input: torch.Tensor, padding_mode: str, padding: Any) -> bool:
    """Whether a convolution of ``input`` can go to oneDNN: a CPU float32 tensor, zero padding given in voxels,
    oneDNN built in and enabled (``torch.backends.mkldnn``), and torch's operator for it present (it is not in
    PyTorch's documented API; the Slicer module may run another torch than the pinned one)."""
    return (
        hasattr(torch, "mkldnn_convolution")
        and input.device.type == "cpu"
        and input.dtype == torch.float32
        and padding_mode == "zeros"
        and not isinstance(padding, str)
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


class Head(Conv3d):
    """A network's last convolution: `Conv3d` with its output in PyTorch's standard (contiguous) layout, the layout
    the networks' callers work in (a softmax over hof's 29 classes of a channels-last tensor took 142 ms instead of
    43, its mirror averaging 120 instead of 66). A 1x1x1 head on the CPU's path is one matrix product per batch item
    written straight into that layout (`_pointwise`: hof's 8 -> 29 classes on 2 x 64 x 80 x 80 voxels 55 ms on one
    thread, against 234 ms for oneDNN's convolution and the copy); any other copies its output (2 ms for a 3-channel
    field)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        pointwise = self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1) and self.padding == (0, 0, 0)
        if pointwise and self.groups == 1 and _on_onednn(input, self.padding_mode, self.padding):
            return _pointwise(input, self.weight, self.bias)
        return super().forward(input).contiguous()


def _pointwise(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """out[b, o, v] = sum_c W[o, c] x[b, c, v] + bias[o] for every voxel v: a 1x1x1 convolution as a batched matrix
    product of the weights and the voxels' channel rows (a view of a channels-last input), in the standard layout."""
    n, channels = input.shape[:2]
    rows = input.contiguous(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1).reshape(n, -1, channels)
    w = weight.reshape(weight.shape[0], channels).expand(n, -1, -1)
    if bias is None:
        out = torch.bmm(w, rows.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.view(1, -1, 1).expand(n, -1, rows.shape[1]), w, rows.transpose(1, 2))
    return out.view(n, -1, *input.shape[2:])
