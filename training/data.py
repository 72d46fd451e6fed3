"""Datasets as decoded uint8 arrays: one decode, then every path (PIL views, GPU views, kNN).

Specs are the one image-source grammar of ``ascl.image_sources`` (``describe_specs()``): a
folder (ImageFolder layout ``PATH/<class>/*.jpg``, or unlabelled: labels -1), a list file, an
archive or ``cifar10-offline[:TAR]`` (decoded once into a cache under ``$ASCL_CACHE`` or
``~/.cache/ascl``), the torchvision sets (``cifar10``/``cifar100``: val = the official test
split; ``stl10``: train = train + unlabeled, labels -1, val = test) and ``digits``.

Where there is no test split, ``val`` is held out of the training split: the last
``val_fraction`` of every class in file order (0.1: the last 500 of each CIFAR-10 class), and
``train`` is the rest. Everything is decoded at ``image_size`` (shorter side resized, centre
crop: ``ascl.images``), so memory is N x S x S x 3 bytes (CIFAR-10 at 32 px: 150 MB).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ascl.errors import AsclError
from ascl.image_sources import (
    TORCHVISION,
    DecodedImages,
    ImageSourceError,
    load_arrays,
    load_torchvision,
    parse_spec,
    resize_all,
)

if TYPE_CHECKING:
    import torch

__all__ = ["SPLITS", "TORCHVISION", "DataError", "holdout_mask", "load_split", "load_uint8", "split_holdout"]

SPLITS = ("train", "val")


class DataError(AsclError, ValueError):
    """A dataset that cannot be used; the message names the folder, file or spec."""


def holdout_mask(labels: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean [N]: True for the last ``fraction`` of every class (in order); -1 is one class."""
    mask = np.zeros(len(labels), dtype=bool)
    if fraction <= 0:
        return mask
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n_val = min(len(idx) - 1, math.ceil(len(idx) * fraction)) if len(idx) > 1 else 0
        if n_val > 0:
            mask[idx[-n_val:]] = True
    return mask


def split_holdout(full: DecodedImages, split: str, fraction: float) -> DecodedImages:
    """``train`` = all but the held-out tail of each class, ``val`` = that tail."""
    mask = holdout_mask(full.labels, fraction)
    return full.take(np.flatnonzero(mask if split == "val" else ~mask))


def load_split(spec: str, split: str, *, image_size: int = 32, val_fraction: float = 0.1,
               subset: int = 0) -> DecodedImages:
    """Decoded ``train`` or ``val`` images of a dataset spec (see the module doc)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        source = parse_spec(spec)
        if source.kind == "torchvision":  # its own test split; resized below, after any subset
            data = load_torchvision(source.name, "train" if split == "train" else "test")
        else:
            data = split_holdout(load_arrays(source, image_size), split, val_fraction)
    except ImageSourceError as exc:
        raise DataError(exc.message) from exc
    if len(data) == 0:
        raise DataError(f"{spec}: the {split} split is empty; add images or change data.val_fraction")
    if subset and subset < len(data):
        pick = np.sort(np.random.default_rng(0).permutation(len(data))[:subset])
        data = data.take(pick)
    return DecodedImages(resize_all(data.images, image_size), data.labels, data.classes)


def load_uint8(
    spec: str, split: str, *, image_size: int = 32, val_fraction: float = 0.1, subset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, S, S, 3], labels int64 [N]) as CPU tensors, e.g. for the GPU fast path."""
    import torch

    data = load_split(spec, split, image_size=image_size, val_fraction=val_fraction, subset=subset)
    return torch.from_numpy(np.ascontiguousarray(data.images)), torch.from_numpy(data.labels)
