"""Datasets as decoded uint8 arrays: one decode, then every path (PIL views, GPU views, kNN).

Specs:
  PATH                    a folder: ImageFolder layout (``PATH/<class>/*.jpg``), or any folder
                          of images without class folders (unlabelled: labels -1)
  cifar10 | cifar100      torchvision, downloaded when online; val = the official test split
  stl10                   torchvision; train = train + unlabeled (labels -1), val = test
  cifar10-offline[:TAR]   the offline JPEG copy (default ../shared/data/cifar10/train.tar.gz),
                          decoded once into a cache ($ASCL_CACHE or ~/.cache/ascl)
  digits                  scikit-learn's 1,797 handwritten digits rendered as RGB (tiny runs)

Where there is no test split, ``val`` is held out of the training split: the last
``val_fraction`` of every class in file order (0.1: the last 500 of each CIFAR-10 class), and
``train`` is the rest. Everything is decoded at ``image_size`` (shorter side resized, centre
crop: ``ascl.images``), so memory is N x S x S x 3 bytes (CIFAR-10 at 32 px: 150 MB).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ascl.atomic import atomic_path
from ascl.cache import cache_dir
from ascl.images import decode_image, list_images, load_image, to_rgb_square

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val")
TORCHVISION = ("cifar10", "cifar100", "stl10")
OFFLINE_PREFIX = "cifar10-offline"
DEFAULT_OFFLINE_TAR = Path("../shared/data/cifar10/train.tar.gz")


class DataError(ValueError):
    """A dataset that cannot be used; the message names the folder, file or spec."""


@dataclass
class ImageSet:
    """Decoded images of one split. images: uint8 [N, S, S, 3]; labels: int64 [N] (-1 unlabelled)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)


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


def split_holdout(full: ImageSet, split: str, fraction: float) -> ImageSet:
    """``train`` = all but the held-out tail of each class, ``val`` = that tail."""
    mask = holdout_mask(full.labels, fraction)
    return full.take(np.flatnonzero(mask if split == "val" else ~mask))


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, size, size, 3] with the shared decode rule (no-op when equal)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([to_rgb_square(Image.fromarray(im), size) for im in images])


@functools.lru_cache(maxsize=4)
def load_digits_set(image_size: int) -> ImageSet:
    """scikit-learn's digits (bundled, offline) as RGB uint8 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images / 16.0 * 255).astype(np.uint8)  # [N, 8, 8]
    images = np.stack(
        [
            np.asarray(Image.fromarray(g, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR).convert("RGB"))
            for g in gray
        ]
    )
    return ImageSet(images, digits.target.astype(np.int64), [str(i) for i in range(10)])


def load_folder(folder: Path, image_size: int) -> ImageSet:
    """ImageFolder layout (labels from sub-folders) or an unlabelled folder (labels -1)."""
    try:
        paths = list_images(folder)
    except FileNotFoundError as exc:
        raise DataError(f"{folder}: no such folder; give an image folder or one of {list(TORCHVISION)}, "
                        f"{OFFLINE_PREFIX}[:TAR], digits") from exc
    except OSError as exc:
        raise DataError(f"{folder}: cannot read folder ({exc})") from exc
    if not paths:
        raise DataError(f"{folder}: no images found (looked for .jpg, .jpeg, .png, .webp, .bmp, .gif, .tif)")
    rel = [p.relative_to(folder) for p in paths]
    labelled = all(len(r.parts) >= 2 for r in rel)
    classes = sorted({r.parts[0] for r in rel}) if labelled else []
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r.parts[0]] if labelled else -1 for r in rel], dtype=np.int64)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda p: load_image(p, image_size), paths))
    return ImageSet(np.stack(images), labels, classes)


def offline_tar_path(spec: str) -> Path:
    """The tar named by ``cifar10-offline[:TAR]`` (default: ../shared/data/cifar10/train.tar.gz)."""
    given = spec[len(OFFLINE_PREFIX) + 1 :] if spec.startswith(OFFLINE_PREFIX + ":") else ""
    candidates = [Path(given)] if given else [
        DEFAULT_OFFLINE_TAR,
        Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train.tar.gz",
    ]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise DataError(f"{candidates[0]}: offline CIFAR-10 tar not found; pass {OFFLINE_PREFIX}:PATH/train.tar.gz "
                    "or use --data cifar10 (downloads when online)")


def decode_cifar_tar(tar_path: Path) -> ImageSet:
    """Decode every ``train/<class>/<file>.jpg`` of the tar (no extraction to disk: no path tricks)."""
    files: dict[str, list[tuple[str, bytes]]] = {}
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 2 or not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
                    continue
                fh = tar.extractfile(member)
                if fh is not None:
                    files.setdefault(parts[-2], []).append((member.name, fh.read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{tar_path}: not a readable tar.gz of images ({exc})") from exc
    if not files:
        raise DataError(f"{tar_path}: no images inside (expected train/<class>/<n>.jpg)")
    classes = sorted(files)
    items = [(label, name, data) for label, cls in enumerate(classes) for name, data in sorted(files[cls])]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        images = list(pool.map(lambda it: decode_image(it[2], 32, name=f"{tar_path}:{it[1]}"), items))
    return ImageSet(np.stack(images), np.array([it[0] for it in items], dtype=np.int64), classes)


def load_offline_cifar(spec: str) -> ImageSet:
    """The offline CIFAR-10 copy, decoded once and cached as .npy (read back without pickle)."""
    tar_path = offline_tar_path(spec)
    stat = tar_path.stat()
    key = hashlib.sha256(f"{tar_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "cifar10-offline" / key
    paths = {name: folder / f"{name}.npy" for name in ("images", "labels")}
    classes_file = folder / "classes.txt"
    if all(p.is_file() for p in paths.values()) and classes_file.is_file():
        images = np.load(paths["images"], allow_pickle=False)
        labels = np.load(paths["labels"], allow_pickle=False)
        return ImageSet(images, labels, classes_file.read_text().split())
    full = decode_cifar_tar(tar_path)
    for name, arr in (("images", full.images), ("labels", full.labels)):
        with atomic_path(paths[name]) as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
    with atomic_path(classes_file) as tmp:
        tmp.write_text("\n".join(full.classes))
    return full


def load_torchvision(name: str, split: str) -> ImageSet:
    """CIFAR-10/100 or STL-10 through torchvision; a clear error naming the offline option."""
    import torchvision

    root = cache_dir() / "torchvision"
    try:
        if name in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            ds = cls(str(root), train=split == "train", download=True)
            return ImageSet(np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64), list(ds.classes))
        parts = ["train", "unlabeled"] if split == "train" else ["test"]
        sets = [torchvision.datasets.STL10(str(root), split=p, download=True) for p in parts]
        images = np.concatenate([s.data.transpose(0, 2, 3, 1) for s in sets])  # [N, 96, 96, 3]
        labels = np.concatenate([np.asarray(s.labels, dtype=np.int64) for s in sets])
        return ImageSet(np.ascontiguousarray(images), labels, list(sets[0].classes))
    except (OSError, RuntimeError) as exc:
        raise DataError(
            f"{name}: could not load or download into {root} ({exc}). Offline? Use --data {OFFLINE_PREFIX} "
            f"(the shipped CIFAR-10 copy) or an image folder, or copy the torchvision files into {root}"
        ) from exc


def load_split(spec: str, split: str, *, image_size: int = 32, val_fraction: float = 0.1, subset: int = 0) -> ImageSet:
    """Decoded ``train`` or ``val`` images of a dataset spec (see the module doc)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if spec in TORCHVISION:
        data = load_torchvision(spec, split)
    else:
        if spec == "digits":
            full = load_digits_set(image_size)
        elif spec == OFFLINE_PREFIX or spec.startswith(OFFLINE_PREFIX + ":"):
            full = load_offline_cifar(spec)
        else:
            full = load_folder(Path(spec), image_size)
        data = split_holdout(full, split, val_fraction)
    if len(data) == 0:
        raise DataError(f"{spec}: the {split} split is empty; add images or change data.val_fraction")
    if subset and subset < len(data):
        pick = np.sort(np.random.default_rng(0).permutation(len(data))[:subset])
        data = data.take(pick)
    return ImageSet(resize_all(data.images, image_size), data.labels, data.classes)


def load_uint8(
    spec: str, split: str, *, image_size: int = 32, val_fraction: float = 0.1, subset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, S, S, 3], labels int64 [N]) as CPU tensors, e.g. for the GPU fast path."""
    import torch

    data = load_split(spec, split, image_size=image_size, val_fraction=val_fraction, subset=subset)
    return torch.from_numpy(np.ascontiguousarray(data.images)), torch.from_numpy(data.labels)
