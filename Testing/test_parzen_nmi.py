"""The Parzen NMI of the affine stage against its definition, and its written-out gradient against finite differences."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm

from JointRegSegLib.losses.parzen_nmi import NMI_BINS, NMI_SIGMA_RATIO, ParzenNMI


def _studholme(fixed: np.ndarray, warped: np.ndarray) -> float:
    """(H(F) + H(W)) / H(F, W) of Gaussian Parzen weights over every bin (scipy's density, normalised per sample)."""
    centres = np.linspace(0.0, 1.0, NMI_BINS)

    def weights(x: np.ndarray) -> np.ndarray:
        density = norm.pdf(np.clip(x, 0.0, 1.0)[:, None], loc=centres, scale=NMI_SIGMA_RATIO / (NMI_BINS - 1))
        return density / density.sum(axis=1, keepdims=True)

    joint = weights(fixed).T @ weights(warped) / len(fixed)

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    return (entropy(joint.sum(axis=1)) + entropy(joint.sum(axis=0))) / entropy(joint)


def _pair(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(3)
    fixed = rng.uniform(0.0, 1.0, n)
    warped = np.clip(0.8 * fixed + rng.normal(0.0, 0.08, n), -0.05, 1.05)  # a few beyond [0, 1]: clamped
    return torch.as_tensor(fixed), torch.as_tensor(warped)


def test_loss_is_minus_studholme_nmi_of_the_parzen_histogram() -> None:
    fixed, warped = _pair()
    loss, _ = ParzenNMI().select(fixed).loss_and_gradient(warped)
    np.testing.assert_allclose(float(loss), -_studholme(fixed.numpy(), warped.numpy()), rtol=1e-9)


def test_gradient_matches_central_differences() -> None:
    fixed, warped = _pair()
    nmi = ParzenNMI().select(fixed)
    _, gradient = nmi.loss_and_gradient(warped)
    step = 1e-6
    inside = np.flatnonzero((warped.numpy() > 0.01) & (warped.numpy() < 0.99))[:40]
    for i in inside:
        up, down = warped.clone(), warped.clone()
        up[i] += step
        down[i] -= step
        slope = (float(nmi.loss_and_gradient(up)[0]) - float(nmi.loss_and_gradient(down)[0])) / (2 * step)
        assert abs(float(gradient[i]) - slope) <= 1e-6 * max(1.0, abs(slope)) + 1e-9
    outside = (warped < 0) | (warped > 1)
    assert outside.any() and torch.all(gradient[outside] == 0)  # clamped values do not move the loss
