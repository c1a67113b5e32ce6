"""Studholme's normalised mutual information of sampled intensities with a Gaussian Parzen window, and its
derivative by each sample of the moving image, written out instead of taken by autograd.

``NMI = (H(F) + H(W)) / H(F, W)`` from the joint histogram ``P = F^T W / n`` of the fixed samples' Parzen
weights ``F (n, bins)`` and the warped samples' ``W (n, bins)`` (bin centres ``linspace(0, 1, bins)``,
kernel sd ``sigma_ratio`` of a bin, each sample's weights normalised to sum 1, values clamped to [0, 1]);
the loss is ``-NMI``. The affine stage (`methods.affine_stage`) evaluates it and its gradient a few hundred
times on a few thousand samples, where autograd's graph of about a hundred small operations cost more than
the arithmetic.

The derivative, sample ``i``, its Parzen window ``j`` (bins ``b_ij``), position ``x_i = clamp(w_i, 0, 1) (bins -
1)``, kernel ``k_ij = exp(-d_ij^2 / 2 s^2)`` with ``d_ij = x_i - b_ij`` and ``s`` the sd in bins, ``S_i = sum_j
k_ij``, ``W_ij = k_ij / S_i``:

- ``dL/dP = -(dH(W)/dP H(F, W) - (H(F) + H(W)) dH(F, W)/dP) / H(F, W)^2``, with ``dH(p)/dp = -(log p + 1)``
  (``p`` clamped below at 1e-12 in the log, where the derivative is ``-log 1e-12``, as autograd has it);
- ``dL/dW = F dL/dP / n``;
- ``dW_ij/dx_i = (k'_ij - W_ij sum_l k'_il) / S_i`` with ``k'_ij = -k_ij d_ij / s^2``;
- ``dL/dw_i = (bins - 1) sum_j dL/dW_{i, b_ij} dW_ij/dx_i``, 0 where ``w_i`` lies outside [0, 1].
"""

from __future__ import annotations

import torch

NMI_BINS = 32
NMI_SIGMA_RATIO = 0.35
PARZEN_REACH = 2  # bins each side of a sample's nearest bin that get a Parzen weight (`ParzenNMI.weights`)
_FLOOR = 1e-12  # probabilities below it count as it in the logarithms


class ParzenNMI:
    """Negative NMI between fixed samples and warped samples (module docstring).

    `select` gives the fixed samples the next evaluations use.
    """

    def __init__(self, bins: int = NMI_BINS, sigma_ratio: float = NMI_SIGMA_RATIO) -> None:
        self.bins = int(bins)
        self.sigma = sigma_ratio / (bins - 1)
        self._selected: torch.Tensor | None = None

    def select(self, values: torch.Tensor) -> "ParzenNMI":
        """Use the fixed samples ``values`` from now on; the same tensor again (every voxel of a small grid, step
        after step) keeps its Parzen weights and entropy."""
        if values is self._selected:
            return self
        self._selected = values
        self.fixed_weights = self.weights(values)
        self.fixed_entropy = _entropy(self.fixed_weights.mean(dim=0))
        return self

    def _window(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each sample's position in bins ``(n, 1)``, its window's bins ``(n, 2 PARZEN_REACH + 1)`` and their
        kernel values (0 for bins beyond the ends)."""
        bins = self.bins
        position = x.reshape(-1, 1).clamp(0.0, 1.0) * (bins - 1)
        window = position.detach().round().long() + torch.arange(-PARZEN_REACH, PARZEN_REACH + 1, device=x.device)
        inside = (window >= 0) & (window < bins)
        k = torch.exp(-0.5 * ((position - window) / (self.sigma * (bins - 1))) ** 2) * inside
        return position, window, k

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(samples, bins) Parzen weights, each row summing to 1.

        Only the ``2 PARZEN_REACH + 1`` bins around a sample's nearest one get a weight: a sample lies at
        most half a bin from its nearest centre, so every bin left out is at least ``PARZEN_REACH + 0.5``
        bins away, where the kernel is below ``exp(-0.5 (2.5 / 0.35)^2) = 8e-12`` of the nearest bin's
        (float32 rounding); ``2 PARZEN_REACH + 1`` exponentials per sample instead of one per bin.
        """
        _, window, k = self._window(x)
        return self._spread(window, k / k.sum(dim=1, keepdim=True))

    def _spread(self, window: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
        bins = self.bins
        return torch.zeros(shares.shape[0], bins, dtype=shares.dtype, device=shares.device).scatter_add_(
            1, window.clamp(0, bins - 1), shares
        )

    def loss_and_gradient(self, warped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``-NMI`` of the selected fixed samples and ``warped`` (one value per sample), and its derivative by each
        warped value (module docstring)."""
        bins = self.bins
        position, window, k = self._window(warped)
        total = k.sum(dim=1, keepdim=True)
        shares = k / total
        n = shares.shape[0]
        joint = self.fixed_weights.T @ self._spread(window, shares) / n
        marginal = joint.sum(dim=0)
        h_joint, h_warped = _entropy(joint), _entropy(marginal)
        numerator = self.fixed_entropy + h_warped
        d_joint = -(_entropy_slope(marginal)[None, :] * h_joint - numerator * _entropy_slope(joint)) / h_joint**2
        d_shares = (self.fixed_weights @ d_joint / n).gather(1, window.clamp(0, bins - 1))
        spread = self.sigma * (bins - 1)
        dk = -k * (position - window) / spread**2
        d_position = (d_shares * (dk - shares * dk.sum(dim=1, keepdim=True)) / total).sum(dim=1)
        within = (warped.reshape(-1) >= 0.0) & (warped.reshape(-1) <= 1.0)
        return -numerator / h_joint, d_position * (bins - 1) * within


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(_FLOOR))).sum()


def _entropy_slope(p: torch.Tensor) -> torch.Tensor:
    """d entropy / d p (module docstring)."""
    return -(torch.log(p.clamp_min(_FLOOR)) + (p >= _FLOOR))
