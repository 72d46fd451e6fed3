"""ASCL: adaptive soft contrastive loss (Feng & Patras, ICPR 2022, arXiv 2207.11163).

MoCo treats every queue entry as a negative. ASCL instead asks the *key* which queue entries
look like the same instance: similarities of the key to the queue at temperature ``t2`` give a
distribution ``p``; its normalised entropy gives a confidence ``c = 1 - H(p)/log K``; the queue
targets become ``min(n * c * p, 1)`` beside a positive of 1, and rows are normalised. The query
is trained with soft cross-entropy against these targets. Pure functions first, then a thin
module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("ascl", "ahcl", "hard", "none")


def contrastive_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t1: float) -> torch.Tensor:
    """Logits over [positive, queue]. q, k: [N, D]; queue: [K, D] -> [N, 1 + K]."""
    l_pos = torch.einsum("nd,nd->n", q, k).unsqueeze(1)  # [N, 1]
    l_neg = torch.einsum("nd,kd->nk", q, queue)  # [N, K]
    return torch.cat([l_pos, l_neg], dim=1) / t1  # [N, 1 + K]


def neighbour_distribution(k: torch.Tensor, queue: torch.Tensor, t2: float) -> torch.Tensor:
    """Softmax of key-to-queue similarities at temperature t2. [N, D], [K, D] -> p [N, K]."""
    return F.softmax(torch.einsum("nd,kd->nk", k, queue) / t2, dim=1)


def confidence(p: torch.Tensor) -> torch.Tensor:
    """c = 1 - H(p) / log K per row, in [0, 1]. p: [N, K] -> [N]."""
    num = p.shape[1]
    if num < 2:
        return torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)  # [N]
    return (1.0 - entropy / math.log(num)).clamp(0.0, 1.0)


def _top_mask(p: torch.Tensor, n_neighbors: int) -> torch.Tensor:
    """Boolean [N, K] mask of each row's n_neighbors largest entries."""
    idx = p.topk(min(n_neighbors, p.shape[1]), dim=1).indices  # [N, n]
    return torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx, True)


@torch.no_grad()
def targets_from_similarities(sim: torch.Tensor, t2: float, n_neighbors: int, mode: str) -> torch.Tensor:
    """Row-normalised targets over [positive, candidates] from key-to-candidate similarities.

    sim: [N, K] cosine similarities of each key to its K candidates (the queue, or the other
    keys of the batch) -> [N, 1 + K], no gradient.
    ascl: candidate weights min(n * c * p, 1); ahcl: c on the top-n entries; hard: 1 on the
    top-n entries; none: one-hot on the positive (plain InfoNCE).
    """
    n, num = sim.shape
    pos = torch.ones(n, 1, dtype=sim.dtype, device=sim.device)  # [N, 1]
    if mode == "none":
        weights = torch.zeros(n, num, dtype=sim.dtype, device=sim.device)
    else:
        p = F.softmax(sim / t2, dim=1)  # [N, K]
        c = confidence(p).unsqueeze(1)  # [N, 1]
        if mode == "ascl":
            weights = (n_neighbors * c * p).clamp(max=1.0)
        elif mode == "ahcl":
            weights = _top_mask(p, n_neighbors).to(p.dtype) * c
        elif mode == "hard":
            weights = _top_mask(p, n_neighbors).to(p.dtype)
        else:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    targets = torch.cat([pos, weights], dim=1)  # [N, 1 + K]
    return targets / targets.sum(dim=1, keepdim=True)


@torch.no_grad()
def soft_targets(
    k: torch.Tensor, queue: torch.Tensor, t2: float, n_neighbors: int, mode: str
) -> torch.Tensor:
    """Row-normalised targets over [positive, queue]: [N, 1 + K], no gradient (see above)."""
    return targets_from_similarities(torch.einsum("nd,kd->nk", k, queue), t2, n_neighbors, mode)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits)). [N, C], [N, C] -> scalar."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def ascl_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    t1: float = 0.1,
    t2: float = 0.05,
    n_neighbors: int = 1,
    mode: str = "ascl",
) -> torch.Tensor:
    """ASCL loss of queries q against keys k and a queue. q, k: [N, D]; queue: [K, D] -> scalar.

    Logits are computed in float32 even under autocast: the t1 = 0.1 softmax over 4k entries
    is where bf16 loses accuracy.
    """
    q, k, queue = q.float(), k.float(), queue.float()
    targets = soft_targets(k.detach(), queue.detach(), t2, n_neighbors, mode)  # [N, 1 + K]
    logits = contrastive_logits(q, k.detach(), queue.detach(), t1)  # [N, 1 + K]
    return soft_cross_entropy(logits, targets)


def in_batch_ascl_loss(
    q: torch.Tensor,
    keys: torch.Tensor,
    offset: int = 0,
    t1: float = 0.1,
    t2: float = 0.05,
    n_neighbors: int = 1,
    mode: str = "ascl",
) -> torch.Tensor:
    """ASCL where the other keys of the batch act as the queue (for BYOL, which has none).

    q: [N, D] queries; keys: [M, D] all keys of the (global) batch, M >= N + 1, the positive of
    row i being ``keys[offset + i]`` (offset = this rank's first row under DDP). Each row's
    candidates are the M - 1 other keys. -> scalar.
    """
    q, keys = q.float(), keys.detach().float()
    n, m = q.shape[0], keys.shape[0]
    rows = torch.arange(n, device=q.device)
    own = torch.zeros(n, m, dtype=torch.bool, device=q.device)
    own[rows, rows + offset] = True  # [N, M] the positive column of each row
    sim_q = q @ keys.T  # [N, M]
    l_pos = sim_q[own].view(n, 1)  # [N, 1]
    l_neg = sim_q[~own].view(n, m - 1)  # [N, M - 1]
    logits = torch.cat([l_pos, l_neg], dim=1) / t1  # [N, M]
    sim_k = keys[offset : offset + n] @ keys.T  # [N, M]
    targets = targets_from_similarities(sim_k[~own].view(n, m - 1), t2, n_neighbors, mode)  # [N, M]
    return soft_cross_entropy(logits, targets)


class ASCLLoss(nn.Module):
    """Soft multi-instance contrastive loss; ``mode="none"`` is MoCo's InfoNCE exactly.

    Args:
        t1: temperature of the query logits (MoCo's tau).
        t2: temperature of the key-to-queue distribution that makes the pseudo-labels;
            lower means sharper neighbours.
        n_neighbors: expected number of same-instance neighbours in the queue.
        mode: ``ascl`` (soft, adaptive), ``ahcl`` (hard neighbours weighted by confidence),
            ``hard`` (hard neighbours, weight 1), ``none`` (plain InfoNCE).
    """

    def __init__(self, t1: float = 0.1, t2: float = 0.05, n_neighbors: int = 1, mode: str = "ascl") -> None:
        super().__init__()
        if t1 <= 0 or t2 <= 0:
            raise ValueError(f"temperatures must be > 0, got t1={t1}, t2={t2}")
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        self.t1, self.t2, self.n_neighbors, self.mode = t1, t2, n_neighbors, mode

    def forward(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        if q.ndim != 2 or k.shape != q.shape or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(
                f"expected q, k [N, D] and queue [K, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(queue.shape)}"
            )
        if q.shape[0] == 0:
            raise ValueError("empty batch")
        return ascl_loss(q, k, queue, self.t1, self.t2, self.n_neighbors, self.mode)

    def extra_repr(self) -> str:
        return f"t1={self.t1}, t2={self.t2}, n_neighbors={self.n_neighbors}, mode={self.mode!r}"
