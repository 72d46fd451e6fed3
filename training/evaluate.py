"""Evaluation of a trained encoder: kNN (k=200, t=0.1) and a linear probe, on any checkpoint.

The model may be a training checkpoint or run folder, or (when ``ascl.hub`` is installed) a
hub folder, a shipped model name or a hub repo id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ascl.encoder import Encoder
from ascl.training.checkpoint import (
    CheckpointError,
    encoder_from_checkpoint,
    find_checkpoint,
    load_checkpoint,
)
from ascl.training.data import load_split
from ascl.training.distributed import resolve_device
from ascl.training.knn import embed_images, knn_accuracy
from ascl.training.linear_probe import train_linear_probe


def load_model(spec: str) -> Encoder:
    """An Encoder from a checkpoint / run folder, else through ``ascl.hub.load_encoder`` if present."""
    try:
        path = find_checkpoint(spec)
    except CheckpointError:
        path = None
    if path is not None:
        return encoder_from_checkpoint(path)
    try:
        from ascl.hub import load_encoder
    except ImportError:
        raise CheckpointError(f"{spec}: no such checkpoint or run folder") from None
    return load_encoder(spec)  # type: ignore[no-any-return]


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


def features(encoder: Encoder, data: EvalData, *, normalize: bool) -> tuple[torch.Tensor, ...]:
    """(train feats [N, D], train labels [N], val feats [M, D], val labels [M]) at the encoder's size."""
    device = resolve_device(data.device)
    encoder = encoder.to(device).eval()
    out: list[torch.Tensor] = []
    for split, subset in (("train", data.train_subset), ("val", data.val_subset)):
        images = load_split(data.spec, split, image_size=encoder.image_size, val_fraction=data.val_fraction, subset=subset)
        out += [embed_images(encoder, torch.from_numpy(images.images), data.batch_size, device, normalize=normalize),
                torch.from_numpy(images.labels).to(device)]
    return tuple(out)


def evaluate_knn(encoder: Encoder, data: EvalData, *, k: int = 200, t: float = 0.1) -> dict[str, Any]:
    """kNN top-1 on the val split with the train split as the memory bank."""
    train_x, train_y, val_x, val_y = features(encoder, data, normalize=True)
    acc = knn_accuracy(train_x, train_y, val_x, val_y, k, t)
    return {"metric": "knn_top1", "value": acc, "k": k, "t": t, "train_images": len(train_y), "val_images": len(val_y),
            "data": data.spec}


def evaluate_linear(encoder: Encoder, data: EvalData, *, epochs: int = 100, lr: float = 1e-3) -> dict[str, Any]:
    """Linear-probe top-1 on the val split; features pre-extracted once from the frozen encoder."""
    train_x, train_y, val_x, val_y = features(encoder, data, normalize=False)
    result = train_linear_probe(train_x, train_y, val_x, val_y, epochs=epochs, lr=lr)
    return {"metric": "linear_top1", "value": result["val_top1"], "train_top1": result["train_top1"],
            "epochs": epochs, "train_images": len(train_y), "val_images": len(val_y), "data": data.spec}
