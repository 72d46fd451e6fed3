"""Where the demo's gallery images come from, as one folder on disk plus a content key.

``ascl up`` needs a gallery a newcomer already has. ``--gallery`` takes any spec of the one
image-source grammar (``ascl.image_sources.describe_specs()``); without it, in order of
preference: the offline Imagenette photo tar (``ascl.image_sources.default_imagenette_tar()``:
real photos, what users search; a class-balanced subset, so the first start stays within a few
minutes on a laptop CPU); the offline CIFAR-10 JPEG tar (32-px thumbnails); torchvision's
CIFAR-10 when the machine is online; and, offline with none of those, scikit-learn's digits
rendered to images (scikit-learn is a dependency of the ``train`` extra, so it is installed
wherever the demo runs). Each fallback comes with a note for the screen saying what was missing. Every source ends as an ImageFolder-style folder
(``root/<label>/<file>``; a user's folder is used in place) so that the index and the demo can
show the images, and every source has a key that changes when its content does, so caches
built on it can be reused safely. The images are read through ``ascl.image_sources``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ascl.atomic import atomic_dir
from ascl.image_sources import (
    IMAGENETTE_OFFLINE,
    OFFLINE_SETS,
    ImageSourceError,
    SourceImage,
    default_cifar_tar,
    default_imagenette_tar,
    iter_decoded,
    iter_images,
    load_torchvision,
    parse_spec,
    per_class_subset,
    source_fingerprint,
)

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_SUBSET = 2000  # images in a default gallery (200 per class): seconds of CPU embedding
DEFAULT_CLASSES = 10  # both offline sets (Imagenette, CIFAR-10) have ten classes
TORCHVISION_NAMES = {"cifar10": ("CIFAR-10", 10), "cifar100": ("CIFAR-100", 100), "stl10": ("STL-10", 10)}


@dataclass(frozen=True)
class Gallery:
    """A folder of gallery images and what the user should be told about it."""

    root: Path  # folder of images, ImageFolder layout when labels are known
    key: str  # changes whenever the images change; part of every cache key built on them
    description: str  # one line for the screen: what these images are
    note: str | None = None  # shown when the source was a fallback the user did not ask for


def folder_key(root: Path) -> str:
    """Content key of a folder of images: the one source fingerprint (``ascl.image_sources``).

    Hashing every byte of a large photo folder would make each start slow; names, sizes and
    modification times change whenever a file is replaced, which is what a cache needs to notice.
    """
    return source_fingerprint(root)[1][:16]


def _safe_part(name: str | None) -> bool:
    """A single, harmless path component (labels and names come from archives: never trusted as paths)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")  # type: ignore[operator]


def _write_gallery(items: Iterable[SourceImage], root: Path) -> None:
    """Write ``<label>/<file name>`` for every labelled image with a safe label and name, atomically."""
    with atomic_dir(root) as tmp:
        for item in items:
            name = PurePosixPath(item.path).name
            if not (_safe_part(item.label) and _safe_part(name)):
                continue
            folder = tmp / str(item.label)
            folder.mkdir(exist_ok=True)
            (folder / name).write_bytes(item.read())


def from_folder(folder: Path) -> Gallery:
    """A user's own folder, used in place (nothing copied)."""
    folder = folder.expanduser().resolve()
    spec = parse_spec(folder)  # ImageSourceNotFound (a FileNotFoundError) names a missing folder
    if spec.kind != "folder":
        raise ImageSourceError(f"{folder}: not a folder of images")
    count = sum(1 for _ in iter_images(spec))  # raises when it holds no images
    return Gallery(folder, f"dir-{folder_key(folder)}", f"{count} images from {folder}")


def from_list(list_file: Path, cache: Path) -> Gallery:
    """The images a list file names, copied once into ``cache`` (a gallery is one folder)."""
    spec = parse_spec(list_file)
    items = list(iter_images(spec))
    key = f"list-{source_fingerprint(spec)[1][:16]}"
    root = cache / "galleries" / key
    if not root.is_dir():
        with atomic_dir(root) as tmp:
            for i, item in enumerate(items):
                (tmp / f"{i:05d}-{PurePosixPath(item.path).name}").write_bytes(item.read())
    return Gallery(root, key, f"{len(items)} images listed in {list_file}")


def subset_from_tar(tar_path: Path, cache: Path, per_class: int, title: str | None = None) -> Gallery:
    """The first ``per_class`` images of every class of an archive of ``<label>/<image>`` members
    (by name: ``train/<class>/0000.jpg`` first), e.g. the offline Imagenette or CIFAR-10 copy.

    Written once into ``cache`` (member names are parsed, never used as paths, so a crafted
    archive cannot write outside the folder) and reused while the archive is unchanged (its
    ``source_fingerprint``). ``title``: what the images are, for the screen.
    """
    spec = parse_spec(tar_path)
    key = f"tar-{source_fingerprint(spec)[1][:16]}-{per_class}"
    root = cache / "galleries" / key
    if not root.is_dir():
        _write_gallery(per_class_subset(iter_images(spec), per_class), root)
    count = sum(1 for _ in root.rglob("*") if _.is_file())
    what = title or f"images of {tar_path.name}"
    return Gallery(root, key, f"{what}, a subset of {count} ({per_class} per class) from {tar_path}")


def cifar_subset_from_tar(tar_path: Path, cache: Path, per_class: int) -> Gallery:
    """``subset_from_tar`` of the offline CIFAR-10 JPEG copy."""
    return subset_from_tar(tar_path, cache, per_class, "CIFAR-10 training images (32 px)")


def _title_of(spec_text: str) -> str | None:
    """What an offline archive spec (``imagenette-offline[:PATH]``, ...) holds, in words."""
    for prefix, known in OFFLINE_SETS.items():
        if spec_text == prefix or spec_text.startswith(prefix + ":"):
            return known.what[0].upper() + known.what[1:]
    return None


def cifar_subset_from_torchvision(cache: Path, per_class: int, timeout_s: float = 15.0, *,
                                  name: str = "cifar10") -> Gallery:
    """Download a torchvision set (``cifar10`` unless ``name`` says another; needs internet) and keep
    a balanced PNG subset: the first ``per_class`` training images of every class."""
    title, _ = TORCHVISION_NAMES[name]
    key = f"{name}tv-{per_class}"
    root = cache / "galleries" / key
    if not root.is_dir():
        data = load_torchvision(name, "train", root=cache / "torchvision", timeout_s=timeout_s)
        _write_gallery(per_class_subset(iter_decoded(data, f"{name}:train"), per_class), root)
    return Gallery(root, key, f"{title} training images from torchvision, {per_class} per class")


def digits_gallery(cache: Path, size: int = 32) -> Gallery:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped with the package) as RGB PNGs."""
    key = f"sklearn-digits-{size}"
    root = cache / "galleries" / key
    if not root.is_dir():
        _write_gallery(iter_images("digits", render_size=size), root)
    return Gallery(root, key, f"scikit-learn's 1,797 handwritten digits, rendered at {size}x{size}")


def resolve_gallery(source: str | None, cache: Path, *, subset: int = DEFAULT_SUBSET,
                    cifar_tar: Path | None = None, photo_tar: Path | None = None) -> Gallery:
    """The gallery for ``ascl up``: ``source`` when given (any image-source spec), else the best
    default this machine has (see the module doc), with a note saying which and why.
    ``photo_tar`` / ``cifar_tar``: the archives to prefer (default: ``default_imagenette_tar()``,
    ``default_cifar_tar()``)."""
    per_class = max(1, subset // DEFAULT_CLASSES)
    if source:
        spec = parse_spec(source)  # ImageSourceNotFound (a FileNotFoundError) for a missing path
        if spec.kind == "folder":
            return from_folder(spec.path)  # type: ignore[arg-type]
        if spec.kind == "list":
            return from_list(spec.path, cache)  # type: ignore[arg-type]
        if spec.kind == "tar":
            return subset_from_tar(spec.path, cache, per_class, _title_of(spec.text))  # type: ignore[arg-type]
        if spec.kind == "digits":
            return digits_gallery(cache)
        classes = TORCHVISION_NAMES[spec.name][1]
        return cifar_subset_from_torchvision(cache, max(1, subset // classes), name=spec.name)
    photos = photo_tar if photo_tar is not None else default_imagenette_tar()
    if photos is not None and photos.is_file():
        return subset_from_tar(photos, cache, per_class, "Imagenette photos (160 px)")
    missing = (f"no Imagenette photo copy {f'at {photos}' if photos is not None else 'beside the checkout'} "
               f"(set ${IMAGENETTE_OFFLINE.env} or pass --gallery {IMAGENETTE_OFFLINE.prefix}:PATH)")
    tar = cifar_tar if cifar_tar is not None else default_cifar_tar()
    if tar is not None and tar.is_file():
        gallery = cifar_subset_from_tar(tar, cache, per_class)
        return Gallery(gallery.root, gallery.key, gallery.description,
                       f"{missing}; using CIFAR-10's 32-px thumbnails instead. Pass --gallery FOLDER for your "
                       "own photos.")
    try:
        gallery = cifar_subset_from_torchvision(cache, per_class)
    except Exception as exc:  # offline: URLError, timeouts, DNS failures, checksum errors
        gallery = digits_gallery(cache)
        where = f"at {tar}" if tar is not None else "(set $ASCL_CIFAR10_TAR or pass --gallery cifar10-offline:PATH)"
        reason = f"{missing}, no CIFAR-10 copy {where} and the torchvision download failed ({_short(exc)})"
        return Gallery(gallery.root, gallery.key, gallery.description,
                       f"{reason}; using scikit-learn's digits instead. Pass --gallery FOLDER for your own images.")
    return Gallery(gallery.root, gallery.key, gallery.description,
                   f"{missing}; using CIFAR-10 thumbnails from torchvision instead.")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__
