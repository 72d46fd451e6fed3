"""ASCL: adaptive soft contrastive loss (Feng & Patras, ICPR 2022, arXiv 2207.11163).

MoCo treats every queue entry as a negative. ASCL instead asks the *key* which queue entries
look like the same instance: similarities of the key to the queue at temperature ``t2`` give a
distribution ``p``; its normalised entropy gives a confidence ``c = 1 - H(p)/log K``; the queue
targets become ``min(n * c * p, 1)`` beside a positive of 1, and rows are normalised. The query
is trained with soft cross-entropy against these targets. Pure functions first, then thin
modules: ``ASCLLoss`` (MoCo's queue) and, for BYOL (no queue: the other targets of the batch are
the candidates), ``InBatchASCLLoss`` and BYOL's own ``BYOLRegressionLoss``. The modes are
``ascl.training.config.LOSS_MODES``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ascl.training.config import LOSS_MODES as MODES


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


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or the widest input dtype when that is wider (float64 stays float64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


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

    Computed in at least float32, never below the inputs' precision: under bf16 autocast the
    ``q.k / t1`` softmax over 4k entries is where bf16 loses accuracy, and float64 inputs
    (reference checks) stay float64.
    """
    dtype = compute_dtype(q, k, queue)
    q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
    targets = soft_targets(k.detach(), queue.detach(), t2, n_neighbors, mode)  # [N, 1 + K]
    logits = contrastive_logits(q, k.detach(), queue.detach(), t1)  # [N, 1 + K]
    return soft_cross_entropy(logits, targets)


def in_batch_ascl_regression(
    h: torch.Tensor,
    z: torch.Tensor,
    offset: int = 0,
    t2: float = 0.05,
    n_neighbors: int = 1,
    mode: str = "ascl",
) -> torch.Tensor:
    """BYOL + ASCL as the authors released it: a soft regression onto the batch's targets.

    h: [N, D] normalised predictions of this rank; z: [M, D] normalised targets of the
    (global) batch, M >= N + 1, the own target of row i being ``z[offset + i]``. Row i's
    weights come from the targets' own similarities: softmax(z_i . z_j / t2) over the M - 1
    other rows, confidence c = 1 - H/log(M - 1), off-diagonal weight min(n . c . p_ij, 1)
    (``mode`` as in ``targets_from_similarities``), own weight 1, the row normalised. Loss:
    mean_i (2 - 2 sum_j w_ij h_i . z_j); ``mode="none"`` is BYOL's own 2 - 2 cos(h_i, z_i).
    No temperature applies to h (the regression has no softmax). -> scalar.
    """
    dtype = compute_dtype(h, z)
    h, z = h.to(dtype), z.detach().to(dtype)
    n, m = h.shape[0], z.shape[0]
    rows = torch.arange(n, device=h.device)
    own = torch.zeros(n, m, dtype=torch.bool, device=h.device)
    own[rows, rows + offset] = True  # [N, M] the own-target column of each row
    with torch.no_grad():
        sim_z = z[offset : offset + n] @ z.T  # [N, M]
        weights = targets_from_similarities(sim_z[~own].view(n, m - 1), t2, n_neighbors, mode)  # [N, M]
    sim_h = h @ z.T  # [N, M]
    ordered = torch.cat([sim_h[own].view(n, 1), sim_h[~own].view(n, m - 1)], dim=1)  # [N, M]: own first
    return (2 - 2 * (weights * ordered).sum(dim=1)).mean()


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
