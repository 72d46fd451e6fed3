"""The reference training step: fp32 forward, backward, optimiser step.

``make_fast_step`` (``ascl.training.fast``) has the same signature and is interchangeable;
the loop owns the scheduler step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_reference_step(framework: nn.Module, optimizer: torch.optim.Optimizer) -> Step:
    """A step ``(x_q, x_k) -> detached loss``; no host synchronisation."""

    def step(x_q: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = framework(x_q, x_k)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step
