"""Adam for the optimisation loops of the methods, without `torch.optim.Adam`'s start-up cost.

Building the first `torch.optim.Adam` imports ``torch._dynamo`` (its methods are wrapped to disable
the compiler): about 1.5 s of CPU time, 3 s on a busy 2-core machine, spent inside a registration
the user waits for. `Adam` runs torch's functional Adam (`torch.optim.adam.adam`, the arithmetic
`torch.optim.Adam` itself runs on the CPU: the single-tensor path) on its own state, so the results
are the same, bit for bit (a test compares them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.adam import adam


class Adam:
    """Adam (Kingma and Ba 2015) over ``parameters``; ``lr`` may be changed between steps."""

    def __init__(
        self, parameters: Sequence[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.parameters = list(parameters)
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.exp_avgs = [torch.zeros_like(p) for p in self.parameters]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.parameters]
        self.steps = [torch.tensor(0.0) for _ in self.parameters]

    def zero_grad(self) -> None:
        """Forget the parameters' gradients (as ``zero_grad(set_to_none=True)``)."""
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        chosen = [n for n, p in enumerate(self.parameters) if p.grad is not None]
        adam(
            [self.parameters[n] for n in chosen],
            [self.parameters[n].grad for n in chosen],
            [self.exp_avgs[n] for n in chosen],
            [self.exp_avg_sqs[n] for n in chosen],
            [],
            [self.steps[n] for n in chosen],
            foreach=False,
            capturable=False,
            differentiable=False,
            fused=None,
            grad_scale=None,
            found_inf=None,
            has_complex=False,
            amsgrad=False,
            beta1=self.betas[0],
            beta2=self.betas[1],
            lr=self.lr,
            weight_decay=0.0,
            eps=self.eps,
            maximize=False,
        )
