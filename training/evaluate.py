"""Evaluation of a trained encoder: kNN (``KNN_K``, ``KNN_T``) and a linear probe, on any checkpoint.

The model may be a training checkpoint or run folder, or (when ``ascl.hub`` is installed) a
hub folder, a shipped model name or a hub repo id. The protocol is the one of ``ascl eval``
and of the model card (``ascl push``): the dataset spec's ``train`` split is the kNN memory bank
and the probe's training set, its ``val`` split is measured. ``evaluate`` embeds both splits
once and returns both accuracies with the val embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ascl.encoder import Encoder
from ascl.models import load_encoder
from ascl.training.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
)
from ascl.training.data import load_split
from ascl.training.distributed import resolve_device
from ascl.training.knn import KNN_K, KNN_T, embed_images, knn_accuracy
from ascl.training.linear_probe import train_linear_probe

PROBE_EPOCHS = 100  # the linear probe's epochs over the cached features
PROBE_LR = 1e-3  # its Adam learning rate (cosine decay)


def load_model(spec: str) -> Encoder:
    """The Encoder of any model spec (``ascl.models``: a run folder, a checkpoint, a hub folder, a name)."""
    return load_encoder(spec)


def default_data(spec: str) -> str | None:
    """The dataset a checkpoint was trained on (None for hub models)."""
    try:
        return str(load_checkpoint(find_checkpoint(spec))["config"]["data"]["spec"])
    except (CheckpointError, KeyError, TypeError):
        return None


@dataclass
class EvalData:
    """Where to evaluate: dataset spec, held-out fraction, optional subsets (0 = all)."""

    spec: str
    val_fraction: float = 0.1
    train_subset: int = 0
    val_subset: int = 0
    batch_size: int = 512
    device: str = "auto"


@dataclass
class Features:
    """Embeddings of both splits at the encoder's image size, on the evaluation device.

    train_x: [N, D], train_y: [N], val_x: [M, D], val_y: [M] (labels -1: unlabelled);
    unit norm with ``normalize=True``, else the raw pooled features. ``classes``: the val
    split's class names (may be empty).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str] = field(default_factory=list)


def features(encoder: Encoder, data: EvalData, *, normalize: bool) -> Features:
    """Embed the train and val splits of ``data`` once (see ``Features``)."""
    device = resolve_device(data.device)
    encoder = encoder.to(device).eval()
    out: list[torch.Tensor] = []
    classes: list[str] = []
    for split, subset in (("train", data.train_subset), ("val", data.val_subset)):
        images = load_split(data.spec, split, image_size=encoder.image_size, val_fraction=data.val_fraction, subset=subset)
        out += [embed_images(encoder, torch.from_numpy(images.images), data.batch_size, device, normalize=normalize),
                torch.from_numpy(images.labels).to(device)]
        classes = list(images.classes)
    train_x, train_y, val_x, val_y = out
    return Features(train_x, train_y, val_x, val_y, classes)


def evaluate_knn(encoder: Encoder, data: EvalData, *, k: int = KNN_K, t: float = KNN_T) -> dict[str, Any]:
    """kNN top-1 on the val split with the train split as the memory bank."""
    f = features(encoder, data, normalize=True)
    acc = knn_accuracy(f.train_x, f.train_y, f.val_x, f.val_y, k, t)
    return {"metric": "knn_top1", "value": acc, "k": k, "t": t, "train_images": len(f.train_y),
            "val_images": len(f.val_y), "data": data.spec}


def evaluate_linear(encoder: Encoder, data: EvalData, *, epochs: int = PROBE_EPOCHS, lr: float = PROBE_LR) -> dict[str, Any]:
    """Linear-probe top-1 on the val split; features pre-extracted once from the frozen encoder."""
    f = features(encoder, data, normalize=False)
    result = train_linear_probe(f.train_x, f.train_y, f.val_x, f.val_y, epochs=epochs, lr=lr)
    return {"metric": "linear_top1", "value": result["val_top1"], "train_top1": result["train_top1"],
            "epochs": epochs, "train_images": len(f.train_y), "val_images": len(f.val_y), "data": data.spec}


@dataclass
class Evaluation:
    """Both accuracies (in [0, 1]) of one embedding pass, and the unit-norm val embeddings."""

    knn_top1: float
    linear_top1: float
    n_train: int
    n_val: int
    val_embeddings: torch.Tensor  # [M, D] unit norm, on the evaluation device
    val_labels: torch.Tensor  # [M], -1 for unlabelled images
    classes: list[str]
    knn_by_k: dict[int, float] = field(default_factory=dict)  # kNN top-1 for every k asked for


def evaluate(
    encoder: Encoder, data: EvalData, *, k: int = KNN_K, t: float = KNN_T, also_k: tuple[int, ...] = (),
    probe_epochs: int = PROBE_EPOCHS, probe_lr: float = PROBE_LR,
) -> Evaluation:
    """kNN top-1 and linear-probe top-1 of ``encoder`` on ``data``, embedding each split once.

    The same numbers as ``evaluate_knn`` and ``evaluate_linear``: the probe trains on the raw
    pooled features, the kNN vote runs on their unit-norm versions (the encoder's embeddings).
    ``also_k``: more neighbour counts to vote with on the same embeddings (``knn_by_k``).
    """
    f = features(encoder, data, normalize=False)
    train_n, val_n = F.normalize(f.train_x, dim=1), F.normalize(f.val_x, dim=1)  # the embeddings
    by_k = {kk: knn_accuracy(train_n, f.train_y, val_n, f.val_y, kk, t) for kk in dict.fromkeys((k, *also_k))}
    probe = train_linear_probe(f.train_x, f.train_y, f.val_x, f.val_y, epochs=probe_epochs, lr=probe_lr)
    return Evaluation(knn_top1=by_k[k], linear_top1=probe["val_top1"], n_train=len(f.train_y), n_val=len(f.val_y),
                      val_embeddings=val_n, val_labels=f.val_y, classes=f.classes, knn_by_k=by_k)
