"""Real images for parity checks, calibration and benchmarks, as uint8 arrays with labels.

Sources: a folder of images (flat, or an ImageFolder tree whose sub-folder names are labels)
or a ``.tar.gz`` in the same layout (the offline CIFAR-10 copy). Every image goes through
``ascl.images.load_image``/``decode_image``, the one preprocessing rule that serving uses, so a
check here sees exactly the pixels a client would send.
"""

from __future__ import annotations

import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from ascl.images import IMAGE_SUFFIXES, decode_image, list_images, load_image

# The offline CIFAR-10 copy beside a checkout (see ../shared/data/cifar10/README.md).
T = TypeVar("T")
CIFAR_COPY = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train.tar.gz"


@dataclass(frozen=True)
class ImageSet:
    """uint8 images [N, S, S, 3] with integer labels [N] (None when the source has no classes)."""

    images: np.ndarray
    labels: np.ndarray | None
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def default_source() -> Path | None:
    """The CIFAR-10 copy when this checkout has one, else None."""
    return CIFAR_COPY if CIFAR_COPY.is_file() else None


def _label_of(relative: Path) -> str | None:
    """ImageFolder rule: the first folder below the root names the class; files at the root have none."""
    return relative.parts[0] if len(relative.parts) > 1 else None


def _finish(arrays: list[np.ndarray], names: list[str | None], source: str) -> ImageSet:
    if not arrays:
        raise ValueError(f"{source}: no images found (expected {', '.join(IMAGE_SUFFIXES)} files)")
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


def _from_folder(folder: Path, size: int, count: int, offset: int, seed: int) -> ImageSet:
    groups: dict[str | None, list[Path]] = {}
    for path in list_images(folder):
        groups.setdefault(_label_of(path.relative_to(folder)), []).append(path)
    for members in groups.values():
        random.Random(seed).shuffle(members)  # sorted, then a fixed shuffle: reproducible
    chosen = _interleave(groups)[offset : offset + count]
    arrays = [load_image(p, size) for p in chosen]
    names = [_label_of(p.relative_to(folder)) for p in chosen]
    return _finish(arrays, names, str(folder))


def _from_tar(archive: Path, size: int, count: int, offset: int) -> ImageSet:
    """One pass over the archive, keeping at most offset + count encoded images per class."""
    keep = offset + count
    groups: dict[str | None, list[tuple[str, bytes]]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not member.isfile() or Path(member.name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                parts = Path(member.name).parts  # train/<class>/<file> or <class>/<file>
                label = parts[-2] if len(parts) >= 2 else None
                group = groups.setdefault(label, [])
                handle = tar.extractfile(member) if len(group) < keep else None
                if handle is not None:
                    group.append((member.name, handle.read()))
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"{archive}: not a readable image archive ({exc})") from exc
    for members in groups.values():
        members.sort()
    chosen = [(label, name, data) for label, members in groups.items() for name, data in members]
    by_label: dict[str | None, list[tuple[str | None, str, bytes]]] = {}
    for item in chosen:
        by_label.setdefault(item[0], []).append(item)
    picked = _interleave(by_label)[offset : offset + count]
    arrays = [decode_image(data, size, name=f"{archive}:{name}") for _, name, data in picked]
    return _finish(arrays, [label for label, _, _ in picked], str(archive))


def load_image_set(source: str | Path, size: int, *, count: int, offset: int = 0, seed: int = 0) -> ImageSet:
    """Up to ``count`` images of ``source`` at ``size`` px, skipping the first ``offset``.

    The order is fixed and class-balanced (round-robin over classes; within a class a seeded
    shuffle for folders, name order for archives), so any prefix has every class and disjoint
    sets (a verification gallery and a calibration sample) come from different offsets.
    Raises FileNotFoundError for a missing source and ValueError for one without images.
    """
    source = Path(source)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if source.is_dir():
        return _from_folder(source, size, count, offset, seed)
    if source.is_file() and source.name.endswith((".tar", ".tar.gz", ".tgz")):
        return _from_tar(source, size, count, offset)
    if source.exists():
        raise ValueError(f"{source}: expected a folder of images or a .tar.gz of them")
    raise FileNotFoundError(f"{source}: no such folder or archive")


def synthetic_image_set(size: int, count: int, seed: int = 0) -> ImageSet:
    """Smooth random images, for fp32 parity when no real images are at hand (no labels)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(count, 4, 4, 3)).astype(np.float32)  # [N, 4, 4, 3]
    reps = -(-size // 4)
    images = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :size, :size]  # [N, S, S, 3]
    noise = rng.normal(0, 12, size=images.shape)
    return ImageSet(np.clip(images + noise, 0, 255).astype(np.uint8), None, (), "synthetic")
