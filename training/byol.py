"""BYOL with an injected loss: online encoder + projector + predictor, EMA target, no queue.

ASCL needs candidates to find neighbours among; BYOL has no queue, so the targets of the
other images of the (global) batch play that part (``ascl.training.loss.InBatchASCLLoss``: the
authors' soft regression). ``mode="none"`` is BYOL's own regression loss (``BYOLRegressionLoss``).
The loss is symmetric over the two views (the released code trains one direction per step;
BYOL's paper symmetrises).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ascl.encoder import Encoder
from ascl.training import distributed as D
from ascl.training.loss import BatchLoss
from ascl.training.modules import ProjectionHead, convert_split_batchnorm, frozen_copy, momentum_update


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
