"""kNN evaluation of embeddings: the standard weighted vote of InstDisc/MoCo (``KNN_K``, ``KNN_T``)."""

from __future__ import annotations

import torch

from ascl.encoder import Encoder
from ascl.training import distributed as D

# The kNN protocol of the paper (and of InstDisc/MoCo on CIFAR): 200 neighbours, vote temperature 0.1.
# The one definition, used by 'ascl eval knn' and by the card's evaluation (ascl push); the training
# monitor takes k and t from the run's config (eval.knn_k / eval.knn_t), which default to these.
KNN_K = 200
KNN_T = 0.1


@torch.no_grad()
def embed_images(
    encoder: Encoder, images: torch.Tensor, batch_size: int, device: torch.device, *, normalize: bool = True
) -> torch.Tensor:
    """uint8 [N, S, S, 3] (CPU) -> float32 embeddings [N, D] on ``device`` (unit norm, or raw pooled).

    Under torchrun each rank embeds a contiguous shard and the shards are gathered in order.
    """
    was_training = encoder.training
    encoder.eval()
    n, world, rank = images.shape[0], D.world_size(), D.rank()
    lo, hi = rank * n // world, (rank + 1) * n // world
    forward = encoder.forward if normalize else encoder.forward_features
    feats = [
        forward(encoder.normalize_uint8(images[i : min(i + batch_size, hi)].to(device))).float()
        for i in range(lo, hi, batch_size)
    ]
    encoder.train(was_training)
    local = torch.cat(feats) if feats else torch.zeros(0, encoder.embedding_dim, device=device)  # [n_rank, D]
    return D.gather_uneven(local)  # [N, D]


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
    k: int = KNN_K, t: float = KNN_T, chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN vote: each of the k nearest bank entries votes exp(sim / t) for its label.

    bank: [M, D], bank_labels: [M], queries: [Q, D] (all unit norm) -> predicted labels [Q].
    """
    k = min(k, bank.shape[0])
    preds = []
    for i in range(0, queries.shape[0], chunk):
        sim = queries[i : i + chunk] @ bank.T  # [c, M]
        top_sim, top_idx = sim.topk(k, dim=1)  # [c, k]
        votes = torch.zeros(sim.shape[0], num_classes, device=bank.device)  # [c, C]
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=bank.device)


def knn_accuracy(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
    k: int = KNN_K, t: float = KNN_T,
) -> float:
    """Top-1 accuracy (in [0, 1]) of the weighted kNN vote; unlabelled entries (-1) are dropped."""
    keep_b, keep_q = bank_labels >= 0, query_labels >= 0
    bank, bank_labels = bank[keep_b], bank_labels[keep_b]
    queries, query_labels = queries[keep_q], query_labels[keep_q]
    if bank.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError("kNN needs labelled images in both the train and the val split")
    num_classes = int(max(bank_labels.max().item(), query_labels.max().item())) + 1
    pred = knn_predict(bank, bank_labels.to(bank.device), queries, num_classes, k, t)
    return float((pred.cpu() == query_labels.cpu()).float().mean().item())
