"""Image similarity losses: global NCC, local NCC, Parzen mutual information and MultiAxisMI.

All functions take torch tensors shaped (B, C, I, J, K), images normalised to [0, 1], and return a
scalar tensor to MINIMISE (the negated similarity). They are differentiable and device agnostic.
MONAI is imported where it is first used, not with this module: ``import monai`` loads every
MONAI sub-package (3-4 s of CPU time), which a worker whose method never calls MONAI's losses
(e.g. tto with the local NCC refinement) should not wait for.

Choices recorded here:

- ``ncc_loss``: seed 004 appendix B, eq. 4, computed per batch item over all channels and voxels
  (optionally weighted by a mask), then averaged over the batch. Range [-1, 1]; -1 for any
  positive affine intensity relation, +1 for a negative one.
- ``lncc_loss``: a thin wrapper of MONAI ``LocalNormalizedCrossCorrelationLoss`` with a
  rectangular (box) window of ``window`` voxels per side. MONAI returns
  ``-mean(cc^2)`` with ``cc^2 = cross^2 / (var_a * var_b)`` where ``cross``/``var`` are local
  sums over the window; windows at the volume border are zero padded, each local variance is
  clamped below at 1e-5 and the mean runs over batch, channels and all voxels. This is the
  VoxelMorph/JERS local NCC (same square, same zero-padded box sums; VoxelMorph adds 1e-5 to the
  product of variances instead of clamping). The value lies in [-1, 0]; constant regions (e.g. a
  zero background in both images) contribute 0, so the minimum of a real image pair is above -1.
- ``LocalNCC``: the same value as ``lncc_loss`` against one fixed image, for optimisation loops
  that evaluate it hundreds of times: the fixed image's local sums are computed once, and the box
  sums are shifted slice sums in a custom autograd function whose backward pass is the same box
  sum (a zero-padded symmetric box is self-adjoint). MONAI's separable convolutions take PyTorch's
  slow single-batch convolution path on the CPU; this is about twice as fast for a 5^3 window.
- ``mi_loss``: MONAI ``GlobalMutualInformationLoss`` with its Gaussian Parzen kernel: ``bins``
  bin centres at ``linspace(0, 1, bins)``, kernel sd = ``sigma_ratio`` x bin spacing, per-sample
  weights normalised over the bins, inputs clamped to [0, 1]. The Gaussian kernel is chosen over
  MONAI's B-spline one because its bins are fixed in [0, 1] (the B-spline variant takes the
  min/max over the whole batch tensor, which would couple the slices that MultiAxisMI batches) and
  because it treats both images symmetrically. The Parzen kernel smooths the joint histogram, so
  the MI is a few per cent below a hard-histogram MI and MI(a, a) is below the entropy of a unless
  ``sigma_ratio`` is small.
- ``multi_axis_mi_loss``: seed 004 appendix A, eq. 3: the mean of the slice-wise MI over all
  slices along the three axes, i.e. ``sum of slice MIs / (D + H + W)``, a pooled mean over slices
  (not the mean of three axis means; the two agree for cubic volumes without empty slices).
  Empty slices are skipped, and the pooled mean runs over the remaining slices. A slice is empty
  when fewer than ``min_fraction`` of its FIXED-image voxels exceed ``threshold`` (default 0:
  strictly positive voxels count); only the fixed image decides, so the set of slices does not
  change while the warp is optimised. The slices are batched (moved into the batch dimension)
  and MONAI's MI is called once per axis with ``reduction='none'``. Channels are treated as
  further batch items; the loss is the mean over batch items that have at least one non-empty
  slice (0 when none has). Memory grows as slices x voxels-per-slice x bins per axis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from JointRegSegLib.errors import InputError

if TYPE_CHECKING:
    from monai.losses import GlobalMutualInformationLoss


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    """Raise InputError unless ``a`` and ``b`` are (B, C, I, J, K) tensors of the same shape."""
    if a.ndim != 5 or b.ndim != 5:
        raise InputError(
            f"{names}: expected tensors shaped (B, C, I, J, K), got {tuple(a.shape)} and {tuple(b.shape)}; "
            "add the batch and channel axes with x[None, None]."
        )
    if a.shape != b.shape:
        raise InputError(
            f"{names}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; resample both onto the same grid."
        )


def _check_mask(mask: torch.Tensor, a: torch.Tensor, names: str) -> None:
    """Raise InputError unless ``mask`` is (B, 1 or C, I, J, K) matching ``a``."""
    same_grid = mask.ndim == 5 and mask.shape[0] == a.shape[0] and mask.shape[2:] == a.shape[2:]
    if not same_grid or mask.shape[1] not in (1, a.shape[1]):
        raise InputError(
            f"{names}: mask shape {tuple(mask.shape)} does not match the images {tuple(a.shape)}; "
            "pass a (B, 1, I, J, K) mask on the same grid."
        )


def ncc_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Negative global normalised cross-correlation (seed 004, appendix B, eq. 4).

    ``mask`` (B, 1, I, J, K), binary or soft, weights the voxels. ``eps`` is added to each variance.
    """
    _check_pair(a, b, "ncc_loss")
    if mask is None:
        w = torch.ones_like(a)
    else:
        _check_mask(mask, a, "ncc_loss")
        w = mask.to(a).expand_as(a)
    dims = tuple(range(1, a.ndim))
    w_sum = w.sum(dim=dims, keepdim=True)
    if bool((w_sum <= 0).any()):
        raise InputError("ncc_loss: the mask is empty for at least one batch item; pass a mask with foreground.")
    mean_a = (w * a).sum(dim=dims, keepdim=True) / w_sum
    mean_b = (w * b).sum(dim=dims, keepdim=True) / w_sum
    da, db = a - mean_a, b - mean_b
    cov = (w * da * db).sum(dim=dims) / w_sum.flatten()
    var_a = (w * da * da).sum(dim=dims) / w_sum.flatten()
    var_b = (w * db * db).sum(dim=dims) / w_sum.flatten()
    ncc = cov * torch.rsqrt(var_a + eps) * torch.rsqrt(var_b + eps)
    return -ncc.mean()


def lncc_loss(a: torch.Tensor, b: torch.Tensor, window: int = 9) -> torch.Tensor:
    """Local squared NCC with a ``window``^3 box, ``-mean(cc^2)`` (MONAI/VoxelMorph), in [-1, 0]."""
    _check_pair(a, b, "lncc_loss")
    if window < 1 or window % 2 == 0:
        raise InputError(f"lncc_loss: window must be a positive odd number of voxels, got {window}.")
    from monai.losses import LocalNormalizedCrossCorrelationLoss  # on first use: see the module docstring

    loss = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=window, kernel_type="rectangular")
    return loss(a, b)


class _BoxSum(torch.autograd.Function):
    """Sum over a ``window``^3 box around every voxel (zero padding); self-adjoint, so backward = forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: int) -> torch.Tensor:  # type: ignore[override]
        ctx.window = window
        return _box_sum(x, window)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _box_sum(grad, ctx.window), None


def box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum of ``x (B, C, I, J, K)`` over the ``window``^3 box centred on each voxel, zero outside; differentiable."""
    return _BoxSum.apply(x, int(window))


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """`box_sum` without autograd: per axis, the copy plus its shifts by 1 .. window // 2 both ways, added in place."""
    radius = window // 2
    for axis in (2, 3, 4):
        size = x.shape[axis]
        total = x.clone()
        for shift in range(1, min(radius, size - 1) + 1):
            total.narrow(axis, shift, size - shift).add_(x.narrow(axis, 0, size - shift))
            total.narrow(axis, 0, size - shift).add_(x.narrow(axis, shift, size - shift))
        x = total
    return x


class LocalNCC:
    """``lncc_loss(fixed, warped, window)`` for one fixed image and many warped images (see the module docstring)."""

    def __init__(self, fixed: torch.Tensor, window: int = 9, eps: float = 1e-5) -> None:
        if fixed.ndim != 5:
            raise InputError(f"LocalNCC: expected a fixed image shaped (B, C, I, J, K), got {tuple(fixed.shape)}.")
        if window < 1 or window % 2 == 0:
            raise InputError(f"LocalNCC: window must be a positive odd number of voxels, got {window}.")
        self.fixed, self.window, self.eps = fixed.detach(), int(window), float(eps)
        self.count = float(window**3)
        self.sum_f = _box_sum(self.fixed, self.window)
        self.var_f = (_box_sum(self.fixed * self.fixed, self.window) - self.sum_f**2 / self.count).clamp_min(self.eps)

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        """``-mean(cc^2)`` of the fixed image and ``warped`` (same shape), differentiable w.r.t. ``warped``."""
        _check_pair(self.fixed, warped, "LocalNCC")
        sums = box_sum(torch.cat([warped, warped * warped, self.fixed * warped], dim=1), self.window)
        sum_w, sum_ww, sum_fw = sums.chunk(3, dim=1)
        cross = sum_fw - self.sum_f * sum_w / self.count
        var_w = (sum_ww - sum_w * sum_w / self.count).clamp_min(self.eps)
        return -(cross * cross / (self.var_f * var_w)).mean()


def _parzen_mi(bins: int, sigma_ratio: float, reduction: str) -> GlobalMutualInformationLoss:
    """MONAI's Gaussian Parzen MI loss (returns -MI)."""
    if bins < 2:
        raise InputError(f"mutual information needs at least 2 bins, got {bins}.")
    if sigma_ratio <= 0:
        raise InputError(f"sigma_ratio must be positive, got {sigma_ratio}.")
    from monai.losses import GlobalMutualInformationLoss  # on first use: see the module docstring

    return GlobalMutualInformationLoss(
        kernel_type="gaussian", num_bins=bins, sigma_ratio=sigma_ratio, reduction=reduction
    )


def mi_loss(
    a: torch.Tensor, b: torch.Tensor, bins: int = 32, sigma_ratio: float = 0.5, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative Parzen mutual information (Gaussian kernel, inputs clamped to [0, 1]), batch mean.

    With ``mask`` (B, 1, I, J, K; voxels > 0.5 are used) the MI of each batch item is computed
    over its masked voxels only.
    """
    _check_pair(a, b, "mi_loss")
    mi = _parzen_mi(bins, sigma_ratio, "none")
    if mask is None:
        return mi(a, b).mean()
    _check_mask(mask, a, "mi_loss")
    keep = (mask > 0.5).expand_as(a)
    per_item = []
    for n in range(a.shape[0]):
        if not bool(keep[n].any()):
            raise InputError(f"mi_loss: the mask of batch item {n} is empty; pass a mask with foreground.")
        per_item.append(mi(a[n][keep[n]][None, None], b[n][keep[n]][None, None]))
    return torch.cat(per_item).mean()


def _axis_slices(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Slices of x (N, I, J, K) across spatial ``axis`` (0, 1, 2) as rows: (N * S, voxels per slice)."""
    n, s = x.shape[0], x.shape[axis + 1]
    return x.movedim(axis + 1, 1).reshape(n * s, -1)


def multi_axis_mi_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    bins: int = 32,
    min_fraction: float = 0.01,
    sigma_ratio: float = 0.5,
    threshold: float = 0.0,
) -> torch.Tensor:
    """Negative MultiAxisMI (seed 004, appendix A, eq. 3): pooled mean slice MI over the three axes.

    Slices whose fixed image has fewer than ``min_fraction`` voxels above ``threshold`` are skipped.
    Returns 0 (with a gradient path) when every slice is empty.
    """
    _check_pair(fixed, warped, "multi_axis_mi_loss")
    if not 0.0 <= min_fraction <= 1.0:
        raise InputError(f"multi_axis_mi_loss: min_fraction must be in [0, 1], got {min_fraction}.")
    mi = _parzen_mi(bins, sigma_ratio, "none")
    b, c = fixed.shape[:2]
    f = fixed.reshape(b * c, *fixed.shape[2:])
    w = warped.reshape(b * c, *warped.shape[2:])
    mi_sum = warped.new_zeros(b * c)
    count = warped.new_zeros(b * c)
    for axis in range(3):
        f_rows, w_rows = _axis_slices(f, axis), _axis_slices(w, axis)
        owner = torch.arange(b * c, device=f.device).repeat_interleave(f.shape[axis + 1])
        valid = (f_rows > threshold).to(f_rows.dtype).mean(dim=1) >= min_fraction
        if not bool(valid.any()):
            continue
        neg_mi = mi(f_rows[valid][:, None], w_rows[valid][:, None])  # (valid slices,), eq. 3 summands
        mi_sum = mi_sum.index_add(0, owner[valid], -neg_mi)
        count = count.index_add(0, owner[valid], torch.ones_like(neg_mi))
    if not bool((count > 0).any()):
        return (warped * 0).sum()
    per_item = mi_sum[count > 0] / count[count > 0]  # eq. 3: sum over slices / number of slices
    return -per_item.mean()
