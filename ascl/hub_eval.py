"""Accuracy of an encoder for its model card, measured with the training package's own protocol.

Data, splits and the two protocols are those of ``ascl eval`` (``ascl.training``): the dataset
spec's ``train`` split is the kNN memory bank and the probe's training set, its ``val`` split
is measured (the official test split, or the last ``val_fraction`` of every class held out of
the training split). The images are embedded once; the validation embeddings are kept for the
card's 2-D projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ascl.encoder import Encoder

KNN_K = 200
KNN_T = 0.1


@dataclass
class Evaluation:
    """Both accuracies (percent), the split they were measured on, and the val embeddings."""

    knn_top1: float
    linear_top1: float
    split: str
    n_train: int
    n_val: int
    val_embeddings: np.ndarray  # [Nv, D] unit norm
    val_labels: np.ndarray  # [Nv]
    classes: list[str]


def describe_split(spec: str, val_fraction: float, n_train: int, n_val: int) -> str:
    """Which images the numbers are measured on, in words that fit a card's table."""
    from ascl.training.data import TORCHVISION

    if spec in TORCHVISION:
        how = "official test split"
    else:
        how = f"last {val_fraction:.0%} of every class held out of the training split"
    return f"{spec} val: {how} ({n_val} images; {n_train} train images as kNN bank / probe training set)"


def evaluate(
    encoder: Encoder, spec: str, *, val_fraction: float = 0.1, subset: int = 0, batch_size: int = 256,
    device: str = "auto", probe_epochs: int = 100,
) -> Evaluation:
    """kNN top-1 (k=200, t=0.1) and linear-probe top-1 of ``encoder`` on dataset ``spec``.

    ``spec`` is any ``ascl train --data`` spec (a labelled folder, digits, cifar10-offline, ...);
    ``subset`` (0 = all) caps both splits for quick checks.
    """
    from ascl.training.data import load_split
    from ascl.training.distributed import resolve_device
    from ascl.training.knn import embed_images, knn_accuracy
    from ascl.training.linear_probe import train_linear_probe

    dev = resolve_device(device)
    encoder = encoder.to(dev).eval()
    kw = {"image_size": encoder.image_size, "val_fraction": val_fraction, "subset": subset}
    train = load_split(spec, "train", **kw)  # type: ignore[arg-type]
    val = load_split(spec, "val", **kw)  # type: ignore[arg-type]
    train_x = embed_images(encoder, torch.from_numpy(train.images), batch_size, dev, normalize=False)  # [N, D]
    val_x = embed_images(encoder, torch.from_numpy(val.images), batch_size, dev, normalize=False)  # [M, D]
    train_y, val_y = torch.from_numpy(train.labels).to(dev), torch.from_numpy(val.labels).to(dev)
    train_n, val_n = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)  # the embeddings
    knn = knn_accuracy(train_n, train_y, val_n, val_y, KNN_K, KNN_T)
    probe = train_linear_probe(train_x, train_y, val_x, val_y, epochs=probe_epochs)
    keep = val.labels >= 0
    return Evaluation(
        knn_top1=100.0 * knn,
        linear_top1=100.0 * probe["val_top1"],
        split=describe_split(spec, val_fraction, len(train.labels), len(val.labels)),
        n_train=len(train.labels),
        n_val=len(val.labels),
        val_embeddings=val_n.cpu().numpy()[keep],
        val_labels=val.labels[keep],
        classes=list(val.classes) or [str(c) for c in range(int(val.labels.max(initial=0)) + 1)],
    )
