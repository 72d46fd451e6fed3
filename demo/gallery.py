"""Where the demo's gallery images come from, as one folder on disk plus a content key.

``ascl up`` needs a gallery a newcomer already has. In order of preference: a folder the user
names; the offline CIFAR-10 copy beside the checkout (a class-balanced subset, so the first
start stays within a few minutes on a laptop CPU); torchvision's CIFAR-10 when the machine is
online; and, offline with neither, scikit-learn's digits rendered to images (scikit-learn is a
dependency of the ``train`` extra, so it is installed wherever the demo runs). Every source ends
as an ImageFolder-style folder (``root/<label>/<file>``) so that the index and the demo can show
the images, and every source has a key that changes when its content does, so caches built on
it can be reused safely.
"""

from __future__ import annotations

import hashlib
import re
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ascl.atomic import atomic_dir

CIFAR_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_SUBSET = 2000  # images in a default gallery: ~15 s of CPU embedding at 32 px
_CIFAR_MEMBER = re.compile(r"^(?:\./)?train/([a-z]+)/(\d+)\.(jpg|jpeg|png)$")


@dataclass(frozen=True)
class Gallery:
    """A folder of gallery images and what the user should be told about it."""

    root: Path  # folder of images, ImageFolder layout when labels are known
    key: str  # changes whenever the images change; part of every cache key built on them
    description: str  # one line for the screen: what these images are
    note: str | None = None  # shown when the source was a fallback the user did not ask for


def folder_key(root: Path) -> str:
    """Content key of a folder: relative path, size and modification time of every image.

    Hashing every byte of a large photo folder would make each start slow; size plus mtime
    changes whenever a file is replaced, which is what a cache needs to notice.
    """
    from ascl.images import list_images

    digest = hashlib.sha256()
    for path in list_images(root):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def from_folder(folder: Path) -> Gallery:
    """A user's own folder, used in place (nothing copied)."""
    from ascl.images import list_images

    folder = folder.expanduser().resolve()
    images = list_images(folder)  # raises FileNotFoundError naming the folder
    if not images:
        raise FileNotFoundError(f"{folder}: no images found (looked for .jpg, .png, .webp, ... recursively)")
    return Gallery(folder, f"dir-{folder_key(folder)}", f"{len(images)} images from {folder}")


def cifar_subset_from_tar(tar_path: Path, cache: Path, per_class: int) -> Gallery:
    """The first ``per_class`` images of every class of the offline CIFAR-10 JPEG copy.

    Extracted once into ``cache`` (member names are parsed, never used as paths, so a crafted
    archive cannot write outside the folder) and reused while the archive is unchanged.
    """
    key = f"cifar10tar-{file_sha256(tar_path)[:16]}-{per_class}"
    root = cache / "galleries" / key
    total = per_class * len(CIFAR_CLASSES)
    description = f"CIFAR-10 training images, a subset of {total} ({per_class} per class) from {tar_path}"
    if not root.is_dir():
        with atomic_dir(root) as tmp, tarfile.open(tar_path, "r:gz") as tar:
            for member in tar:
                match = _CIFAR_MEMBER.match(member.name)
                if not member.isfile() or not match or int(match.group(2)) >= per_class:
                    continue
                label, number, suffix = match.groups()
                if label not in CIFAR_CLASSES:
                    continue
                data = tar.extractfile(member)
                if data is not None:
                    (tmp / label).mkdir(exist_ok=True)
                    (tmp / label / f"{int(number):04d}.{suffix}").write_bytes(data.read())
    return Gallery(root, key, description)


def cifar_subset_from_torchvision(cache: Path, per_class: int, timeout_s: float = 15.0) -> Gallery:
    """Download CIFAR-10 with torchvision (needs internet) and keep a balanced PNG subset."""
    import torchvision

    key = f"cifar10tv-{per_class}"
    root = cache / "galleries" / key
    if not root.is_dir():
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout_s)
        try:
            data = torchvision.datasets.CIFAR10(str(cache / "torchvision"), train=True, download=True)
        finally:
            socket.setdefaulttimeout(previous)
        counts = dict.fromkeys(range(len(CIFAR_CLASSES)), 0)
        with atomic_dir(root) as tmp:
            for image, label in data:
                if counts[label] >= per_class:
                    continue
                folder = tmp / CIFAR_CLASSES[label]
                folder.mkdir(exist_ok=True)
                image.save(folder / f"{counts[label]:04d}.png")
                counts[label] += 1
    return Gallery(root, key, f"CIFAR-10 training images from torchvision, {per_class} per class")


def digits_gallery(cache: Path, size: int = 32) -> Gallery:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped with the package) as RGB PNGs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    key = f"sklearn-digits-{size}"
    root = cache / "galleries" / key
    if not root.is_dir():
        digits = load_digits()
        with atomic_dir(root) as tmp:
            for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
                gray = (pixels / 16.0 * 255).astype(np.uint8)  # [8, 8], 0..16 -> 0..255
                image = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BILINEAR)
                (tmp / str(int(label))).mkdir(exist_ok=True)
                image.convert("RGB").save(tmp / str(int(label)) / f"{i:04d}.png")
    return Gallery(root, key, "scikit-learn's 1,797 handwritten digits, rendered at 32x32")


def resolve_gallery(source: str | None, cache: Path, *, subset: int = DEFAULT_SUBSET,
                    cifar_tar: Path = CIFAR_TAR) -> Gallery:
    """The gallery for ``ascl up``: ``source`` when given (a folder or a CIFAR-10 .tar.gz), else
    the best default this machine has, with a note saying which and why."""
    per_class = max(1, subset // len(CIFAR_CLASSES))
    if source:
        path = Path(source).expanduser()
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            return cifar_subset_from_tar(path, cache, per_class)
        if not path.exists():
            raise FileNotFoundError(f"--gallery {source}: no such folder or file")
        return from_folder(path)
    if cifar_tar.is_file():
        return cifar_subset_from_tar(cifar_tar, cache, per_class)
    try:
        gallery = cifar_subset_from_torchvision(cache, per_class)
    except Exception as exc:  # offline: URLError, timeouts, DNS failures, checksum errors
        gallery = digits_gallery(cache)
        reason = f"no CIFAR-10 copy at {cifar_tar} and the torchvision download failed ({_short(exc)})"
        return Gallery(gallery.root, gallery.key, gallery.description,
                       f"{reason}; using scikit-learn's digits instead. Pass --gallery FOLDER for your own images.")
    return gallery


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__

