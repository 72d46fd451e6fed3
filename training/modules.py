"""Shared pieces the frameworks are composed from: queue, momentum update, heads, shuffle-BN.

No host synchronisation anywhere (no ``.item()``), no hard-coded device: the queue pointer
lives on the device as a tensor, so CPU, one GPU and ``torch.compile`` see the same code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ascl.training import distributed as D

M = TypeVar("M", bound=nn.Module)


class MemoryQueue(nn.Module):
    """Ring buffer of the last ``size`` keys; a batch that does not divide ``size`` wraps around."""

    keys: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be >= 1, got {size}, {dim}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # [K, D]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    @torch.no_grad()
    def enqueue(self, batch: torch.Tensor) -> None:
        """Write ``batch`` [n, D] at the pointer, wrapping, as if row by row (n > size keeps the newest)."""
        n = batch.shape[0]
        skipped = max(0, n - self.size)  # rows that would be overwritten within this same batch
        batch = batch[skipped:]
        idx = (self.ptr + skipped + torch.arange(batch.shape[0], device=self.keys.device)) % self.size  # [m]
        self.keys.index_copy_(0, idx, batch.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)


@torch.no_grad()
def momentum_update(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """EMA of parameters: target = m * target + (1 - m) * online, for each (online, target) pair."""
    online: list[torch.Tensor] = []
    target: list[torch.Tensor] = []
    for o, t in pairs:
        online += [p.detach() for p in o.parameters()]
        target += list(t.parameters())
    if target:
        torch._foreach_lerp_(target, online, 1.0 - momentum)


def frozen_copy(module: M) -> M:
    """A deep copy with gradients off: the starting point of a momentum (EMA) network."""
    import copy

    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class ProjectionHead(nn.Module):
    """Linear -> [BatchNorm] -> ReLU -> Linear (MoCo-v2 without BN; BYOL with BN)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [N, in] -> [N, out]


def split_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_splits: int,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Training-mode BatchNorm with statistics per group of ``n / num_splits`` contiguous samples.

    Each group is a slice along the batch dimension, which is a view in any memory format
    (channels_last included), and goes through the framework's own fused batch-norm kernel;
    the outputs are concatenated in order, keeping the input's layout. On a 2-core CPU this is
    2-4x faster than normalising a ``[g, n/g, C, ...]`` view with separate reduction and
    elementwise ops (measured in ``benchmarks/train_throughput.py``'s history), and it is the
    same arithmetic. Running stats: the mean over groups of each group's own update (unbiased
    variance), as ``F.batch_norm`` applied group by group would leave them.
    x: [N, C, *rest] -> [N, C, *rest]; updates running_mean/var [C] in place.
    """
    n = x.shape[0]
    if n % num_splits:
        raise ValueError(f"batch of {n} does not split into {num_splits} BatchNorm groups; make batch_size a multiple")
    outs, means, variances = [], [], []
    for chunk in x.chunk(num_splits):  # [n/g, C, *rest] views
        mean, var = running_mean.clone(), running_var.clone()  # [C]: this group's own update
        outs.append(F.batch_norm(chunk, mean, var, weight, bias, True, momentum, eps))
        means.append(mean)
        variances.append(var)
    with torch.no_grad():
        running_mean.copy_(torch.stack(means).mean(0))
        running_var.copy_(torch.stack(variances).mean(0))
    return torch.cat(outs)  # [N, C, *rest], the input's memory format


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics come from ``num_splits`` contiguous groups of the batch.

    On one process this is MoCo's shuffle-BN: with the keys shuffled before the key encoder, a
    query and its positive key never share BN statistics, so the pair cannot be spotted
    through them. Same parameters and buffers as nn.BatchNorm*d; plain BN in eval mode.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.num_splits = num_splits

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1 or self.running_mean is None or self.running_var is None:
            return super().forward(x)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return split_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.num_splits, self.momentum or 0.1, self.eps)


def convert_split_batchnorm(module: M, num_splits: int) -> M:
    """Replace every BatchNorm1d/2d in ``module`` by SplitBatchNorm (same state dict keys)."""
    if num_splits <= 1:
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d | nn.BatchNorm2d):
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            convert_split_batchnorm(child, num_splits)
    return module


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the global batch across ranks. x: [n, ...] -> (this rank's shuffled [n, ...], unshuffle idx).

    The permutation is drawn on rank 0 (global torch RNG of the device) and broadcast.
    """
    x_all = D.gather(x)  # [B, ...]
    perm = D.broadcast(torch.randperm(x_all.shape[0], device=x.device))  # [B]
    n, r = x.shape[0], D.rank()
    return x_all[perm[r * n : (r + 1) * n]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(y: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo ``batch_shuffle`` on outputs y: [n, ...] -> this rank's rows in original order."""
    y_all = D.gather(y)  # [B, ...]
    n, r = y.shape[0], D.rank()
    return y_all[unshuffle[r * n : (r + 1) * n]]
