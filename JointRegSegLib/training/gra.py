"""The Gradient Response Algorithm (GRA) of HOF (seed 000, section 3.4, eq. 7-8, Algorithm 1).

Bi-level problem (eq. 1): the leader (registration decoder, parameters ``w``) minimises
``Phi_r(w, theta*(w))`` where the follower (segmentation decoder, ``theta``) minimises
``Phi_s(theta, w)``. Algorithm 1 replaces ``theta*`` by ONE unrolled follower step (line 9)::

    theta_hat(w) = theta - beta * grad_theta Phi_s(theta, w)

and updates ``w`` with the hypergradient of ``L(w) = Phi_r(w, theta_hat(w))`` (eq. 7, chain rule)::

    dL/dw = grad_w Phi_r(w, theta_hat) - beta * grad^2_{w theta} Phi_s(theta, w) . v,
    v = grad_theta_hat Phi_r(w, theta_hat).

`hypergradient` offers three ways to get the mixed second-order term:

- ``"finite_difference"`` (the default; DARTS, Liu et al. 2019): ``grad^2_{w theta} Phi_s . v
  ~ [grad_w Phi_s(theta + eps v, w) - grad_w Phi_s(theta - eps v, w)] / (2 eps)`` with
  ``eps = epsilon / ||v||`` (central difference: error O(eps^2); two extra first-order passes, no
  second-order autograd);
- ``"exact"``: double backward, ``grad_w <grad_theta Phi_s(theta, w), v>`` (a Hessian-vector
  product; used by the tests to check the finite difference);
- ``"rank1"``: the cheap "gradient response" weight. Eq. 8 with the rank-1 (Gauss-Newton)
  approximations ``grad^2_{theta theta} Phi_s ~ g_s g_s^T`` (pseudo-inverse) and
  ``grad^2_{w theta} Phi_s ~ grad_w Phi_s g_s^T`` gives ``grad_w theta* . g_r =
  - grad_w Phi_s <g_s, g_r> / ||g_s||^2``, i.e. the leader descends ``grad_w (Phi_r - lambda Phi_s)``
  with ``lambda = <g_r, g_s> / ||g_s||^2``, ``g_r = grad_theta Phi_r``, ``g_s = grad_theta Phi_s``
  (both at ``theta_hat`` and ``theta`` respectively; no second derivative at all).

Every mode reports ``mixed_ratio`` in ``details``: the norm of the second-order (response) term of the
leader gradient over the norm of its first-order part ``grad_w Phi_r``. With the one-step unroll and
the paper's beta = 5e-4 the finite-difference term is about 1e-4 of the first-order part on our
networks (a numerical no-op: "without GRA" cannot differ); the rank-1 response, which approximates
the implicit-function form of eq. 8 rather than one small step, is of the order of the first-order
part, so it is what `training.hof` uses.

The caller passes the two losses as closures of the follower parameters (a list of tensors in the
order of ``theta``); ``w`` are ordinary leaf tensors the closures use. The closures are called with
different ``theta`` and must use them; they may reuse a graph of ``w`` built once (every backward
pass here retains the graph).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import InputError

LossOfTheta = Callable[[Sequence[torch.Tensor]], torch.Tensor]
MODES = ("finite_difference", "exact", "rank1", "first_order")


@dataclass
class GRAStep:
    """What one GRA evaluation produced."""

    leader_grads: list[torch.Tensor]
    follower_grads: list[torch.Tensor]
    theta_hat: list[torch.Tensor]
    leader_loss: float
    follower_loss: float
    details: dict[str, float] = field(default_factory=dict)


def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    """``d loss / d params`` with zeros for parameters the loss does not use.

    The graph is retained, so closures may share (cache) the ``w``-dependent part of their graph
    (HOF's AAA forward pass) between calls.
    """
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, list(params), allow_unused=True, retain_graph=True, create_graph=create_graph)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _leaves(values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [v.detach().requires_grad_(True) for v in values]


def hypergradient(
    leader_loss: LossOfTheta,
    follower_loss: LossOfTheta,
    w: Sequence[torch.Tensor],
    theta: Sequence[torch.Tensor],
    beta: float,
    mode: str = "finite_difference",
    epsilon: float = 0.01,
) -> GRAStep:
    """Leader gradient of Algorithm 1 (lines 8-11) and the follower's own gradient (see the module docstring).

    ``mode="first_order"`` ignores the follower's response (``theta_hat = theta``): the
    "without GRA" ablation, plain alternating optimisation.
    """
    if mode not in MODES:
        raise InputError(f"GRA mode must be one of {MODES}; got {mode!r}")
    if not beta >= 0 or not epsilon > 0:
        raise InputError(f"GRA needs beta >= 0 and epsilon > 0; got beta={beta}, epsilon={epsilon}")
    w = list(w)
    theta0 = _leaves(theta)
    phi_s = follower_loss(theta0)
    if mode == "exact":
        g_s = _grads(phi_s, theta0, create_graph=True)
    else:
        g_s = _grads(phi_s, theta0)
    details: dict[str, float] = {}
    if mode == "first_order":
        theta_hat = _leaves(theta0)
    else:
        theta_hat = _leaves([t - beta * g for t, g in zip(theta0, g_s)])  # Algorithm 1, line 9
    phi_r = leader_loss(theta_hat)
    grads = _grads(phi_r, [*w, *theta_hat])
    g_w, v = grads[: len(w)], grads[len(w):]  # line 10: grad_w Phi_r and grad_theta_hat Phi_r
    v_norm = float(torch.sqrt(_dot(v, v)))
    details["v_norm"] = v_norm
    if mode == "first_order" or v_norm == 0.0:
        leader = g_w
        details["mixed_ratio"] = 0.0
    elif mode == "finite_difference":
        eps = epsilon / v_norm
        plus = _grads(follower_loss([(t + eps * d).detach() for t, d in zip(theta0, v)]), w)
        minus = _grads(follower_loss([(t - eps * d).detach() for t, d in zip(theta0, v)]), w)
        mixed = [(p - m) / (2.0 * eps) for p, m in zip(plus, minus)]  # grad^2_{w theta} Phi_s . v
        leader = [g - beta * h for g, h in zip(g_w, mixed)]  # eq. 7 with the one-step unroll
        details["mixed_norm"] = float(torch.sqrt(_dot(mixed, mixed)))
        details["mixed_ratio"] = beta * details["mixed_norm"] / max(float(torch.sqrt(_dot(g_w, g_w))), 1e-30)
    elif mode == "exact":
        mixed = _grads(_dot(g_s, [d.detach() for d in v]), w)
        leader = [g - beta * h for g, h in zip(g_w, mixed)]
        details["mixed_norm"] = float(torch.sqrt(_dot(mixed, mixed)))
        details["mixed_ratio"] = beta * details["mixed_norm"] / max(float(torch.sqrt(_dot(g_w, g_w))), 1e-30)
    else:
        g_s_sq = float(_dot(g_s, g_s))
        lam = float(_dot(v, g_s)) / g_s_sq if g_s_sq > 0 else 0.0  # gradient response weight
        dphi_s_dw = _grads(follower_loss([t.detach() for t in theta0]), w)
        leader = [g - lam * d for g, d in zip(g_w, dphi_s_dw)]  # grad_w (Phi_r - lambda Phi_s)
        details["lambda"] = lam
        details["mixed_ratio"] = abs(lam) * float(torch.sqrt(_dot(dphi_s_dw, dphi_s_dw))) / max(float(torch.sqrt(_dot(g_w, g_w))), 1e-30)
    return GRAStep(
        leader_grads=[g.detach() for g in leader],
        follower_grads=[g.detach() for g in g_s],
        theta_hat=[t.detach() for t in theta_hat],
        leader_loss=float(phi_r.detach()),
        follower_loss=float(phi_s.detach()),
        details=details,
    )
