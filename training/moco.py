"""MoCo-v2 with an injected loss: query encoder + head, momentum twins, a queue of past keys.

With ``ASCLLoss(mode="none")`` this is plain MoCo-v2; with ``mode="ascl"`` it is the paper's
method. Keys never leak through BatchNorm: they are shuffled across the (global) batch before
the momentum encoder, and BatchNorm statistics come from per-process groups (split BN on one
process, one group per rank under DDP).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ascl.encoder import Encoder
from ascl.training import distributed as D
from ascl.training.modules import (
    MemoryQueue,
    ProjectionHead,
    batch_shuffle,
    batch_unshuffle,
    convert_split_batchnorm,
    frozen_copy,
    momentum_update,
)

QueueLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MoCo(nn.Module):
    """``forward(x_q, x_k) -> loss``; updates the momentum encoder and the queue as a side effect.

    Args:
        encoder: the Encoder that ships (trained in place).
        loss: ``loss(q [N, C], k [N, C], queue [K, C]) -> scalar``, e.g. ``ASCLLoss``.
        head_hidden, head_dim: MLP projection head (MoCo-v2), dropped after training.
        queue_size: K, keys kept; any batch size works (the ring pointer wraps).
        momentum: m of the EMA key encoder (0.99 for CIFAR-scale runs).
        bn_splits: BatchNorm groups per process (shuffle-BN on a single process).
    """

    def __init__(
        self,
        encoder: Encoder,
        loss: QueueLoss,
        *,
        head_hidden: int = 512,
        head_dim: int = 128,
        queue_size: int = 4096,
        momentum: float = 0.99,
        bn_splits: int = 1,
    ) -> None:
        super().__init__()
        self.encoder = convert_split_batchnorm(encoder, bn_splits)
        self.head = ProjectionHead(encoder.embedding_dim, head_hidden, head_dim)
        self.target_encoder = frozen_copy(self.encoder)
        self.target_head = frozen_copy(self.head)
        self.queue = MemoryQueue(queue_size, head_dim)
        self.loss = loss
        self.momentum = momentum

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, EMA target) module pairs."""
        return [(self.encoder, self.target_encoder), (self.head, self.target_head)]

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.head(self.encoder.forward_features(x_q)), dim=1)  # [N, C]
        with torch.no_grad():
            momentum_update(self.momentum_pairs(), self.momentum)
            x_shuffled, unshuffle = batch_shuffle(x_k)
            k = F.normalize(self.target_head(self.target_encoder.forward_features(x_shuffled)), dim=1)
            k = batch_unshuffle(k, unshuffle)  # [N, C]
        queue = self.queue.keys.clone()  # [K, C]: autograd keeps this copy, the enqueue below edits the buffer
        loss = self.loss(q, k, queue)
        self.queue.enqueue(D.gather(k))  # keys of every rank, in rank order
        return loss
