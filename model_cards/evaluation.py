"""Accuracy of an encoder for its model card, measured by the training package's own evaluation.

Data, splits, the kNN vote (``ascl.training.knn.KNN_K``, ``KNN_T``) and the linear probe are
those of ``ascl eval`` (``ascl.training.evaluate.evaluate``, which embeds both splits once): the
dataset spec's ``train`` split is the kNN memory bank and the probe's training set, its ``val``
split is measured (the official test split, or the last ``val_fraction`` of every class held
out of the training split). This module adds what only a card needs: the split described in
words, percentages, and the labelled val embeddings for the card's 2-D projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ascl.training.knn import KNN_K

if TYPE_CHECKING:
    from ascl.encoder import Encoder

# The kNN votes a card reports: the protocol's k=200 first (``ascl models`` shows the first),
# then k=20, the vote of lightly's Imagenette table, for comparison with published figures.
CARD_KNN_K = (KNN_K, 20)


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
    knn_by_k: dict[int, float]  # percent, for every k of ``CARD_KNN_K``


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
    device: str = "auto",
) -> Evaluation:
    """kNN top-1 and linear-probe top-1 of ``encoder`` on dataset ``spec``, as ``ascl eval`` measures them.

    ``spec`` is any ``ascl train --data`` spec (a labelled folder, digits, cifar10-offline, ...);
    ``subset`` (0 = all) caps both splits for quick checks.
    """
    from ascl.training.evaluate import EvalData
    from ascl.training.evaluate import evaluate as evaluate_both

    ev = evaluate_both(encoder, EvalData(spec, val_fraction, subset, subset, batch_size, device),
                       k=CARD_KNN_K[0], also_k=CARD_KNN_K[1:])
    labels = ev.val_labels.cpu().numpy()  # [Nv]
    keep = labels >= 0
    return Evaluation(
        knn_top1=100.0 * ev.knn_top1,
        linear_top1=100.0 * ev.linear_top1,
        split=describe_split(spec, val_fraction, ev.n_train, ev.n_val),
        n_train=ev.n_train,
        n_val=ev.n_val,
        val_embeddings=ev.val_embeddings.cpu().numpy()[keep],
        val_labels=labels[keep],
        classes=ev.classes or [str(c) for c in range(int(labels.max(initial=0)) + 1)],
        knn_by_k={k: 100.0 * v for k, v in ev.knn_by_k.items()},
    )
