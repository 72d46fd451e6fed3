"""Real images for parity checks, calibration and benchmarks, as uint8 arrays with labels.

Sources are the one image-source grammar of ``ascl.image_sources`` (a folder, ImageFolder
sub-folders giving labels; a list file; a ``.tar.gz`` of ``<label>/<image>`` or
``cifar10-offline[:PATH]``; ``digits``; the torchvision sets). Every image goes through
``ascl.images.decode_image``, the one preprocessing rule that serving uses, so a check here
sees exactly the pixels a client would send. ``ImageSet`` (this module) is such a sample with
the source it came from; the training side's decoded arrays are ``ascl.image_sources.DecodedImages``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ascl.image_sources import SourceImage, iter_images, parse_spec

T = TypeVar("T")


@dataclass(frozen=True)
class ImageSet:
    """uint8 images [N, S, S, 3] with integer labels [N] (None when the source has no classes)."""

    images: np.ndarray
    labels: np.ndarray | None
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _finish(arrays: list[np.ndarray], names: list[str | None], source: str) -> ImageSet:
    if not arrays:
        raise ValueError(f"{source}: no images found (offset beyond the images of the source)")
    images = np.stack(arrays)  # [N, S, S, 3]
    if any(n is None for n in names):
        return ImageSet(images, None, (), source)
    classes = tuple(sorted({str(n) for n in names}))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[str(n)] for n in names], dtype=np.int64)  # [N]
    return ImageSet(images, labels, classes, source)


def _interleave(groups: dict[str | None, list[T]]) -> list[T]:
    """Round-robin over the classes in sorted order: any prefix of the result is class-balanced."""
    ordered = [groups[k] for k in sorted(groups, key=lambda k: "" if k is None else k)]
    longest = max((len(g) for g in ordered), default=0)
    return [g[i] for i in range(longest) for g in ordered if i < len(g)]


def load_image_set(source: str | os.PathLike[str], size: int, *, count: int, offset: int = 0,
                   seed: int = 0) -> ImageSet:
    """Up to ``count`` images of ``source`` at ``size`` px, skipping the first ``offset``.

    The order is fixed and class-balanced (round-robin over classes; within a class a seeded
    shuffle for folders, name order for archives, the source's order otherwise), so any prefix
    has every class and disjoint sets (a verification gallery and a calibration sample) come
    from different offsets. An archive is read once, keeping at most ``offset + count`` images
    per class. Raises FileNotFoundError for a missing source and ValueError for one without
    images (``ascl.image_sources.ImageSourceError`` is both an AsclError and one of those).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    spec = parse_spec(source)
    keep = offset + count
    groups: dict[str | None, list[SourceImage]] = {}
    for item in iter_images(spec):
        group = groups.setdefault(item.label, [])
        if spec.kind == "folder" or len(group) < keep:
            group.append(item)
    for members in groups.values():
        if spec.kind == "folder":
            random.Random(seed).shuffle(members)  # sorted, then a fixed shuffle: reproducible
        elif spec.kind == "tar":
            members.sort(key=lambda item: item.path)
    picked = _interleave(groups)[offset : offset + count]
    return _finish([item.decode(size) for item in picked], [item.label for item in picked], spec.text)


def synthetic_image_set(size: int, count: int, seed: int = 0) -> ImageSet:
    """Smooth random images, for fp32 parity when no real images are at hand (no labels)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(count, 4, 4, 3)).astype(np.float32)  # [N, 4, 4, 3]
    reps = -(-size // 4)
    images = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :size, :size]  # [N, S, S, 3]
    noise = rng.normal(0, 12, size=images.shape)
    return ImageSet(np.clip(images + noise, 0, 255).astype(np.uint8), None, (), "synthetic")



def verification_set(size: int, count: int, source: str | None = None, fallback: str | None = None) -> ImageSet:
    """The images an export is checked against PyTorch on: ``source``, else ``fallback``, else the
    CIFAR-10 copy when one is found, else synthetic images (with a note on stderr: then fp32
    parity means less)."""
    import sys

    from ascl.image_sources import default_cifar_tar

    chosen = source or fallback or default_cifar_tar()
    if chosen is None:
        print("note: no --images given and no CIFAR-10 copy found: verifying on synthetic images", file=sys.stderr)
        return synthetic_image_set(size, count)
    return load_image_set(chosen, size, count=count)
