"""BYOL with an injected loss: online encoder + projector + predictor, EMA target, no queue.

ASCL needs candidates to find neighbours among; BYOL has no queue, so the targets of the
other images of the (global) batch play that part (``InBatchASCLLoss``: the authors' soft
regression). ``mode="none"`` is BYOL's own regression loss. The loss is symmetric over the two
views (the released code trains one direction per step; BYOL's paper symmetrises).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ascl.encoder import Encoder
from ascl.training import distributed as D
from ascl.training.loss import MODES, compute_dtype, in_batch_ascl_regression
from ascl.training.modules import ProjectionHead, convert_split_batchnorm, frozen_copy, momentum_update

# loss(p [N, C] predictions, targets [M, C] of the global batch, offset of this rank's rows) -> scalar
BatchLoss = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class BYOLRegressionLoss(nn.Module):
    """BYOL's 2 - 2 cos(p, z) against the row's own target (the other targets are unused)."""

    def forward(self, p: torch.Tensor, targets: torch.Tensor, offset: int) -> torch.Tensor:
        z = targets[offset : offset + p.shape[0]].detach()  # [N, C]
        dtype = compute_dtype(p, z)
        return (2 - 2 * F.cosine_similarity(p.to(dtype), z.to(dtype), dim=1)).mean()


class InBatchASCLLoss(nn.Module):
    """BYOL + ASCL as released: soft regression onto the targets of the global batch.

    Each row's candidates are the other targets of the global batch; their weights come from
    the targets' similarities at temperature ``t2`` (``in_batch_ascl_regression``). ``t1`` is
    accepted for a common signature with ``ASCLLoss`` and is unused: the released BYOL loss is
    a regression, with no softmax over the predictions.
    """

    def __init__(self, t1: float = 0.1, t2: float = 0.05, n_neighbors: int = 1, mode: str = "ascl") -> None:
        super().__init__()
        if mode not in MODES or t1 <= 0 or t2 <= 0 or n_neighbors < 1:
            raise ValueError(f"bad ASCL settings t1={t1}, t2={t2}, n_neighbors={n_neighbors}, mode={mode!r}")
        self.t1, self.t2, self.n_neighbors, self.mode = t1, t2, n_neighbors, mode

    def forward(self, p: torch.Tensor, targets: torch.Tensor, offset: int) -> torch.Tensor:
        return in_batch_ascl_regression(p, targets, offset, self.t2, self.n_neighbors, self.mode)


class BYOL(nn.Module):
    """``forward(x_q, x_k) -> loss``; updates the EMA target as a side effect.

    Args:
        encoder: the Encoder that ships (trained in place).
        loss: a ``BatchLoss`` (``InBatchASCLLoss`` or ``BYOLRegressionLoss``).
        head_hidden, head_dim: projector MLP (with BN); pred_hidden: predictor MLP.
        momentum: EMA rate of the target network.
        bn_splits: BatchNorm groups per process.
    """

    def __init__(
        self,
        encoder: Encoder,
        loss: BatchLoss,
        *,
        head_hidden: int = 512,
        head_dim: int = 128,
        pred_hidden: int = 512,
        momentum: float = 0.99,
        bn_splits: int = 1,
    ) -> None:
        super().__init__()
        self.encoder = convert_split_batchnorm(encoder, bn_splits)
        self.projector = convert_split_batchnorm(
            ProjectionHead(encoder.embedding_dim, head_hidden, head_dim, batch_norm=True), bn_splits
        )
        self.predictor = convert_split_batchnorm(ProjectionHead(head_dim, pred_hidden, head_dim, batch_norm=True), bn_splits)
        self.target_encoder = frozen_copy(self.encoder)
        self.target_projector = frozen_copy(self.projector)
        self.loss = loss
        self.momentum = momentum

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, EMA target) module pairs."""
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.predictor(self.projector(self.encoder.forward_features(x))), dim=1)  # [N, C]

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.target_projector(self.target_encoder.forward_features(x)), dim=1)  # [N, C]

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
        p_q, p_k = self._online(x_q), self._online(x_k)  # [N, C] each
        with torch.no_grad():
            momentum_update(self.momentum_pairs(), self.momentum)
            z_q, z_k = D.gather(self._target(x_q)), D.gather(self._target(x_k))  # [M, C] each
        offset = D.rank() * x_q.shape[0]
        return 0.5 * (self.loss(p_q, z_k, offset) + self.loss(p_k, z_q, offset))
