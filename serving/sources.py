"""Where gallery images come from: a folder, an ImageFolder tree, the offline CIFAR-10 tar, a list file.

Every source yields ``SourceImage`` records whose bytes are read lazily, so building an index
over 50,000 images never holds them all in memory.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ascl.images import IMAGE_SUFFIXES, list_images

CIFAR_PREFIX = "cifar10-offline"
DEFAULT_CIFAR_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train.tar.gz"


@dataclass(frozen=True)
class SourceImage:
    """One gallery image: its path relative to the source, its label when the layout gives one."""

    path: str
    label: str | None
    source: str
    read: Callable[[], bytes]


def describe_sources() -> str:
    """The help text for --images."""
    return (
        "a folder of images (searched recursively; first-level sub-folders are labels, as in ImageFolder), "
        f"a text file listing one image path per line, or '{CIFAR_PREFIX}[:PATH]' for the CIFAR-10 JPEG tar "
        f"(default PATH {DEFAULT_CIFAR_TAR})"
    )


def iter_source(spec: str, limit: int | None = None) -> Iterator[SourceImage]:
    """Images of ``spec`` in a stable order, at most ``limit`` of them."""
    if spec == CIFAR_PREFIX or spec.startswith(CIFAR_PREFIX + ":"):
        tar = Path(spec.split(":", 1)[1]) if ":" in spec else DEFAULT_CIFAR_TAR
        items: Iterator[SourceImage] = _iter_tar(tar)
    else:
        path = Path(spec)
        if path.is_dir():
            items = _iter_folder(path)
        elif path.is_file():
            items = _iter_list(path)
        else:
            raise FileNotFoundError(f"{spec}: no such folder or list file; --images takes {describe_sources()}")
    for n, item in enumerate(items):
        if limit is not None and n >= limit:
            return
        yield item


def _iter_folder(folder: Path) -> Iterator[SourceImage]:
    files = list_images(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    for file in files:
        rel = file.relative_to(folder)
        label = rel.parts[0] if len(rel.parts) > 1 else None
        yield SourceImage(rel.as_posix(), label, str(folder.resolve()), file.read_bytes)


def _iter_list(list_file: Path) -> Iterator[SourceImage]:
    base = list_file.resolve().parent
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        file = (base / line) if not Path(line).is_absolute() else Path(line)
        if not file.is_file():
            raise FileNotFoundError(f"{list_file}: listed image {line!r} does not exist")
        yield SourceImage(line, None, str(list_file.resolve()), file.read_bytes)


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _iter_tar(tar_path: Path) -> Iterator[SourceImage]:
    """Members ``train/<class>/<n>.jpg`` of the CIFAR-10 copy, read straight from the tar.

    Read in archive order (stable for a given file): seeking backwards in a .gz is slow.
    """
    if not tar_path.is_file():
        raise FileNotFoundError(f"{tar_path}: CIFAR-10 tar not found; pass '{CIFAR_PREFIX}:PATH'")
    with tarfile.open(tar_path, "r|*") as tar:
        for member in tar:
            if not (member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES)):
                continue
            parts = Path(member.name).parts
            label = parts[-2] if len(parts) >= 2 else None
            fh = tar.extractfile(member)
            data = fh.read() if fh is not None else b""
            yield SourceImage(member.name, label, f"{CIFAR_PREFIX}:{tar_path.resolve()}", _constant(data))
