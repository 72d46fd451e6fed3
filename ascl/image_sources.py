"""Where images come from: one spec grammar for training, calibration, indexing and the demo gallery.

A spec is one of (``describe_specs()`` is the help text every command shows):

  PATH                     a folder, searched recursively; first-level sub-folders are labels
                           (ImageFolder); a folder with images at its top level is unlabelled
  PATH                     a text file listing one image path per line (relative to the file's
                           folder; blank lines and ``#`` comments skipped); no labels
  PATH.tar[.gz] | .tgz     an archive of ``.../<label>/<image>`` members (the CIFAR-10 JPEG copy)
  cifar10-offline[:PATH]   the CIFAR-10 JPEG archive (32 px); without PATH the one
                           ``default_offline_tar()`` finds beside the checkout
  imagenette-offline[:PATH]  the Imagenette photo archive (160 px, 10 classes), found the same way
  cifar10 | cifar100 | stl10   torchvision's sets, downloaded when online (a clear error offline)
  digits                   scikit-learn's 1,797 handwritten digits (bundled, offline), rendered by
                           ``render_digits``

The names (``digits``, ``cifar10``, ...) win over a folder of the same name when the spec is a
string; pass a ``Path`` (or ``./digits``) to mean the folder.

Every source yields ``SourceImage`` records in a stable order (folders: sorted paths; list
files: their order; archives: archive order, read as a stream; the array sets: their own
order, numbered per class as ``<label>/<nnnn>.png``), with the encoded bytes read lazily where
the source allows. On top of that: ``load_arrays`` (decoded uint8 arrays at one size, for
training and calibration; archives and folders decoded once per size and cached under
``ascl.cache.cache_dir()``)
and ``per_class_subset`` (the first images of every label, for a demo gallery).

Only the standard library is imported here at module level, so that command-line help can
use ``describe_specs()`` cheaply; numpy, PIL, torchvision and scikit-learn load when used.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import socket
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ascl.atomic import atomic_path
from ascl.cache import cache_dir
from ascl.errors import AsclError

if TYPE_CHECKING:
    import numpy as np

OFFLINE_PREFIX = "cifar10-offline"
IMAGENETTE_PREFIX = "imagenette-offline"
TORCHVISION = ("cifar10", "cifar100", "stl10")
DIGITS = "digits"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CHECKOUT = Path(__file__).resolve().parents[1]  # the source checkout, when this file is in one
DECODED_CACHE_FOLDER = "decoded"  # under cache_dir(): archives and folders decoded once, as .npy
NATIVE_TAR_SIZE = 32  # the CIFAR size: what an archive is decoded at unless a size is asked for


@dataclass(frozen=True)
class OfflineSet:
    """A labelled photo archive that ships beside the checkout (``../shared/data/...``) for offline use.

    ``prefix[:PATH]`` names it as an image source; without PATH the archive is found by
    ``default_offline_tar``: ``$env`` first, then ``shared`` beside the source checkout, then
    ``../shared`` from the working folder. The only place these paths are written in library code.
    """

    prefix: str  # the spec name, e.g. cifar10-offline
    env: str  # the environment variable that names the archive
    shared: Path  # the archive relative to the folder holding a source checkout
    what: str  # for messages: what the archive is
    size: int  # the side its photos are stored at


CIFAR10_OFFLINE = OfflineSet(OFFLINE_PREFIX, "ASCL_CIFAR10_TAR", Path("shared") / "data" / "cifar10" / "train.tar.gz",
                             "the CIFAR-10 JPEG tar", 32)
IMAGENETTE_OFFLINE = OfflineSet(IMAGENETTE_PREFIX, "ASCL_IMAGENETTE_TAR",
                                Path("shared") / "data" / "imagenette" / "train.tar.gz",
                                "the Imagenette photo tar (160 px)", 160)
OFFLINE_SETS = {s.prefix: s for s in (CIFAR10_OFFLINE, IMAGENETTE_OFFLINE)}
# kept for callers that name the CIFAR copy's pieces
CIFAR_TAR_ENV = CIFAR10_OFFLINE.env
SHARED_CIFAR_TAR = CIFAR10_OFFLINE.shared


class ImageSourceError(AsclError, ValueError):
    """A spec that gives no usable images (bad grammar, unreadable archive or list); says what to pass."""


class ImageSourceNotFound(ImageSourceError, FileNotFoundError):
    """A spec naming a folder, file or archive that is not there, or a source with no images in it."""


def describe_specs() -> str:
    """The one help text of an image-source argument (``--data``, ``--images``, ``--calibration``, ``--gallery``)."""
    offline = "; ".join(
        f"'{s.prefix}[:PATH]' for {s.what} (default PATH: ${s.env}, else ../{s.shared.as_posix()} beside the source "
        "checkout or the working folder)" for s in OFFLINE_SETS.values()
    )
    return (
        "a folder of images (searched recursively; first-level sub-folders are labels, as in ImageFolder), "
        "a text file listing one image path per line, a .tar/.tar.gz of <label>/<image> files, "
        f"{offline}; {', '.join(TORCHVISION)} (torchvision; downloaded when online) or '{DIGITS}' "
        "(scikit-learn's 1,797 handwritten digits, offline)"
    )


# ----------------------------------------------------------------------------- the offline archives


def offline_tar_candidates(name: str = OFFLINE_PREFIX) -> list[Path]:
    """Where ``name`` (an ``OFFLINE_SETS`` prefix) without a path looks, in order: its environment
    variable, the copy beside this source checkout, then ``../shared/...`` from the working folder."""
    known = OFFLINE_SETS[name]
    found: list[Path] = []
    env = os.environ.get(known.env)
    if env:
        found.append(Path(env).expanduser())
    if (CHECKOUT / "pyproject.toml").is_file():  # an installed package has no checkout beside it
        found.append(CHECKOUT.parent / known.shared)
    found.append(Path.cwd().parent / known.shared)
    return found


def default_offline_tar(name: str = OFFLINE_PREFIX) -> Path | None:
    """The archive that ``name`` means, or None when there is none.

    Its environment variable comes first; when it is set it must name a file (ImageSourceNotFound
    otherwise: a wrong setting is reported, not skipped).
    """
    known = OFFLINE_SETS[name]
    env = os.environ.get(known.env)
    if env and not Path(env).expanduser().is_file():
        raise ImageSourceNotFound(f"${known.env}={env}: no such file; set it to {known.what} "
                                  f"(train.tar.gz) or unset it")
    for path in offline_tar_candidates(name):
        if path.is_file():
            return path.resolve()
    return None


def require_offline_tar(name: str = OFFLINE_PREFIX) -> Path:
    """``default_offline_tar(name)``, or ImageSourceNotFound saying where it looked and what to do."""
    found = default_offline_tar(name)
    if found is None:
        known = OFFLINE_SETS[name]
        looked = ", ".join(str(p) for p in offline_tar_candidates(name))
        extra = "; or use cifar10 (torchvision, downloads when online)" if name == OFFLINE_PREFIX else ""
        raise ImageSourceNotFound(
            f"no {known.what} found (looked at {looked}): set ${known.env} to its path or pass "
            f"{name}:PATH/train.tar.gz{extra}"
        )
    return found


def default_cifar_tar() -> Path | None:
    """The CIFAR-10 JPEG tar that ``cifar10-offline`` means, or None (``default_offline_tar``)."""
    return default_offline_tar(OFFLINE_PREFIX)


def default_imagenette_tar() -> Path | None:
    """The Imagenette photo tar that ``imagenette-offline`` means, or None (``default_offline_tar``)."""
    return default_offline_tar(IMAGENETTE_PREFIX)


def require_cifar_tar() -> Path:
    """``require_offline_tar`` for the CIFAR-10 copy."""
    return require_offline_tar(OFFLINE_PREFIX)


# ----------------------------------------------------------------------------- the grammar


@dataclass(frozen=True)
class ImageSpec:
    """A parsed spec: ``kind`` is folder, list, tar, torchvision or digits."""

    kind: str
    text: str  # the spec as given (a path as str(Path))
    path: Path | None = None  # the folder, list file or archive
    name: str = ""  # the torchvision set

    @property
    def source(self) -> str:
        """What index metadata records as the images' source."""
        if self.kind in ("folder", "list"):
            return str(self.path.resolve())  # type: ignore[union-attr]
        if self.kind == "tar":
            return f"{OFFLINE_PREFIX}:{self.path.resolve()}"  # type: ignore[union-attr]
        return self.name or self.kind


def parse_spec(spec: str | os.PathLike[str] | ImageSpec) -> ImageSpec:
    """The meaning of ``spec`` (see the module doc); a missing path raises ImageSourceNotFound."""
    from ascl.images import IMAGE_SUFFIXES

    if isinstance(spec, ImageSpec):
        return spec
    if not isinstance(spec, str):  # a Path is always a path, never a set name
        return _path_spec(Path(spec), str(Path(spec)), IMAGE_SUFFIXES)
    text = spec.strip()
    if not text:
        raise ImageSourceError(f"an empty image source; expected {describe_specs()}")
    if text == DIGITS:
        return ImageSpec("digits", text, name=DIGITS)
    if text in TORCHVISION:
        return ImageSpec("torchvision", text, name=text)
    for prefix, known in OFFLINE_SETS.items():
        if text == prefix:
            return ImageSpec("tar", text, require_offline_tar(prefix))
        if text.startswith(prefix + ":"):
            given = text[len(prefix) + 1 :]
            path = Path(given).expanduser()
            if not given or not path.is_file():
                raise ImageSourceNotFound(f"{given or '(empty)'}: no such file; pass {prefix}:PATH with "
                                          f"{known.what} (train.tar.gz), or {prefix} alone for the default")
            return ImageSpec("tar", text, path)
    return _path_spec(Path(text).expanduser(), text, IMAGE_SUFFIXES)


def _path_spec(path: Path, text: str, image_suffixes: tuple[str, ...]) -> ImageSpec:
    if path.is_dir():
        return ImageSpec("folder", text, path)
    if path.is_file():
        if path.name.lower().endswith(TAR_SUFFIXES):
            return ImageSpec("tar", text, path)
        if path.suffix.lower() in image_suffixes:
            raise ImageSourceError(f"{text}: one image, not a source of images; give its folder or a list file")
        return ImageSpec("list", text, path)
    raise ImageSourceNotFound(f"{text}: no such folder or list file; expected {describe_specs()}")


# ----------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class SourceImage:
    """One image of a source: its key, its label when the layout gives one, its bytes on demand."""

    path: str  # key: path relative to the folder, the listed line, the member name, or <label>/<nnnn>.png
    label: str | None
    source: str  # the source it came from (ImageSpec.source)
    read: Callable[[], bytes]  # the encoded bytes (PNG for the array sets)
    name: str = ""  # for messages: the file's full path, or archive:member
    file: Path | None = None  # the file on disk (folders and list files)
    pixels: Callable[[], np.ndarray] | None = field(default=None, repr=False)  # uint8 [H, W, 3], array sets

    def decode(self, size: int) -> np.ndarray:
        """uint8 [size, size, 3] by the one preprocessing rule (``ascl.images``); ImageError names the image."""
        from ascl.images import ImageError, decode_image, to_rgb_square

        if self.pixels is not None:
            from PIL import Image

            return to_rgb_square(Image.fromarray(self.pixels()), size)
        try:
            data = self.read()
        except OSError as exc:
            raise ImageError(f"{self.name or self.path}: cannot read file ({exc.strerror})") from exc
        return decode_image(data, size, name=self.name or self.path)


def iter_images(
    spec: str | os.PathLike[str] | ImageSpec, limit: int | None = None, *, render_size: int = 32,
    split: str = "train", torchvision_root: Path | None = None,
) -> Iterator[SourceImage]:
    """The images of ``spec`` in its stable order, at most ``limit`` of them.

    The spec is checked now (a missing folder raises here, not at the first ``next``).
    ``render_size``: the side ``digits`` are drawn at; ``split``/``torchvision_root``: for the
    torchvision sets (``train`` or ``test``; default root ``cache_dir()/torchvision``).
    """
    parsed = parse_spec(spec)
    if parsed.kind == "folder":
        items: Iterator[SourceImage] = _iter_folder(parsed)
    elif parsed.kind == "list":
        items = _iter_list(parsed)
    elif parsed.kind == "tar":
        items = _iter_tar(parsed)
    elif parsed.kind == "digits":
        items = iter_decoded(render_digits(render_size), parsed.source)
    else:
        items = iter_decoded(load_torchvision(parsed.name, split, root=torchvision_root), f"{parsed.name}:{split}")
    return items if limit is None else _take(items, limit)


def source_fingerprint(spec: str | os.PathLike[str] | ImageSpec) -> tuple[str, str]:
    """(the source as index metadata records it, a fingerprint that changes with its images), cheaply:
    names, sizes and modification times for folders and list files, size and time for archives.

    The one content key of an image source: the export cache's calibration key and the demo's
    gallery and index keys are built on it.
    """
    parsed = parse_spec(spec)
    digest = hashlib.sha256(f"{parsed.kind}\0{parsed.source}\n".encode())
    if parsed.kind == "tar":
        stat = parsed.path.stat()  # type: ignore[union-attr]
        digest.update(f"{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    elif parsed.kind in ("folder", "list"):
        for item in iter_images(parsed):
            stat = item.file.stat()  # type: ignore[union-attr]
            digest.update(f"{item.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return parsed.source, digest.hexdigest()


def _take(items: Iterator[SourceImage], limit: int) -> Iterator[SourceImage]:
    for n, item in enumerate(items):
        if n >= limit:
            return
        yield item


def _iter_folder(spec: ImageSpec) -> Iterator[SourceImage]:
    from ascl.images import IMAGE_SUFFIXES, list_images

    folder = spec.path
    assert folder is not None
    try:
        files = list_images(folder)
    except OSError as exc:
        raise ImageSourceError(f"{folder}: cannot read folder ({exc})") from exc
    if not files:
        raise ImageSourceNotFound(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    source = spec.source

    def generate() -> Iterator[SourceImage]:
        for file in files:
            rel = file.relative_to(folder)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            yield SourceImage(rel.as_posix(), label, source, file.read_bytes, name=str(file), file=file)

    return generate()


def _iter_list(spec: ImageSpec) -> Iterator[SourceImage]:
    list_file = spec.path
    assert list_file is not None
    try:
        lines = list_file.read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise ImageSourceError(f"{list_file}: not a text file listing image paths (one per line)") from exc
    except OSError as exc:
        raise ImageSourceError(f"{list_file}: cannot read list file ({exc.strerror})") from exc
    base = list_file.resolve().parent
    entries: list[tuple[str, Path]] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        file = Path(line) if Path(line).is_absolute() else base / line
        if not file.is_file():
            raise ImageSourceNotFound(f"{list_file}: listed image {line!r} does not exist")
        entries.append((line, file))
    if not entries:
        raise ImageSourceNotFound(f"{list_file}: lists no images (expected one image path per line)")
    source = spec.source
    return (SourceImage(line, None, source, file.read_bytes, name=str(file), file=file) for line, file in entries)


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _iter_tar(spec: ImageSpec) -> Iterator[SourceImage]:
    """Members ``.../<label>/<image>`` read straight from the archive (never extracted: no path tricks).

    Archive order, as a stream (stable for a given file; seeking backwards in a .gz is slow).
    """
    from ascl.images import IMAGE_SUFFIXES

    tar_path = spec.path
    assert tar_path is not None
    source = spec.source
    try:
        with tarfile.open(tar_path, "r|*") as tar:
            for member in tar:
                if not (member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES)):
                    continue
                parts = PurePosixPath(member.name).parts
                label = parts[-2] if len(parts) >= 2 else None
                fh = tar.extractfile(member)
                data = fh.read() if fh is not None else b""
                yield SourceImage(member.name, label, source, _constant(data), name=f"{tar_path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageSourceError(f"{tar_path}: not a readable tar archive of images ({exc})") from exc


def iter_decoded(images: DecodedImages, source: str) -> Iterator[SourceImage]:
    """Records of decoded arrays, keyed ``<label>/<nnnn>.png`` (numbered within the class, like the
    CIFAR-10 JPEG copy) or ``<nnnnn>.png`` when unlabelled; the bytes are PNG, encoded on demand."""
    counts: dict[str | None, int] = {}
    for i in range(len(images)):
        label_id = int(images.labels[i])
        label = images.classes[label_id] if 0 <= label_id < len(images.classes) else None
        n = counts.get(label, 0)
        counts[label] = n + 1
        key = f"{label}/{n:04d}.png" if label is not None else f"{n:05d}.png"
        pixels = _slice(images.images, i)
        yield SourceImage(key, label, source, functools.partial(_png, pixels), name=f"{source}:{key}",
                          pixels=pixels)


def _slice(images: np.ndarray, i: int) -> Callable[[], np.ndarray]:
    return lambda: images[i]


def _png(pixels: Callable[[], np.ndarray]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels()).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- decoded arrays


@dataclass
class DecodedImages:
    """Decoded images: uint8 [N, S, S, 3], labels int64 [N] (-1 unlabelled), class names by label."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, index: np.ndarray) -> DecodedImages:
        return DecodedImages(self.images[index], self.labels[index], self.classes)


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, size, size, 3] with the one decode rule (no-op when equal)."""
    import numpy as np
    from PIL import Image

    from ascl.images import to_rgb_square

    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([to_rgb_square(Image.fromarray(im), size) for im in images])


def decode_all(items: Iterable[SourceImage], size: int,
               progress: Callable[[int], object] | None = None) -> list[np.ndarray]:
    """``item.decode(size)`` for every item, in order, on a few threads (PIL decodes without the GIL);
    ``progress(1)`` after each image."""
    def one(item: SourceImage) -> np.ndarray:
        image = item.decode(size)
        if progress is not None:
            progress(1)
        return image

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, items))


def _labelled(items: list[SourceImage]) -> tuple[np.ndarray, list[str]]:
    """Labels int64 [N] and class names: labelled when every image has a label, else all -1."""
    import numpy as np

    if all(item.label is not None for item in items):
        classes = sorted({str(item.label) for item in items})
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[str(item.label)] for item in items], dtype=np.int64), classes
    return np.full(len(items), -1, dtype=np.int64), []


def load_arrays(spec: str | os.PathLike[str] | ImageSpec, size: int, *, split: str = "train",
                torchvision_root: Path | None = None) -> DecodedImages:
    """Every image of ``spec`` decoded at ``size`` (uint8 [N, size, size, 3]) with labels.

    Order: folders and list files as ``iter_images``; archives by (label, member name).
    Archives and folders are decoded once per size and cached (``decoded_tar``,
    ``decoded_folder``); digits and torchvision sets come in their own order.
    Labels follow the folder rule: labelled when every image has a label, else all -1.
    """
    import numpy as np

    parsed = parse_spec(spec)
    if parsed.kind == "digits":
        return render_digits(size)
    if parsed.kind == "torchvision":
        data = load_torchvision(parsed.name, split, root=torchvision_root)
        return DecodedImages(resize_all(data.images, size), data.labels, data.classes)
    if parsed.kind == "tar":
        assert parsed.path is not None
        return decoded_tar(parsed.path, size)
    if parsed.kind == "folder":
        assert parsed.path is not None
        return decoded_folder(parsed.path, size)
    items = list(iter_images(parsed))
    labels, classes = _labelled(items)
    return DecodedImages(np.stack(decode_all(items, size)), labels, classes)


def decoded_tar(tar_path: Path, size: int = NATIVE_TAR_SIZE) -> DecodedImages:
    """Every image of an archive at ``size``, sorted by (label, member name); decoded once and
    cached (``cached_decode``), keyed by the archive's ``source_fingerprint`` and the size."""
    tar_path = tar_path.resolve()
    spec = ImageSpec("tar", str(tar_path), tar_path)

    def decode() -> DecodedImages:
        items = list(iter_images(spec))
        if not items:
            raise ImageSourceNotFound(f"{tar_path}: no images inside (expected <label>/<image> members, "
                                      "as train/<class>/<n>.jpg)")
        items.sort(key=lambda item: (item.label or "", item.path))
        return _decode_items(items, size, desc=tar_path.name)

    return cached_decode(f"{source_fingerprint(spec)[1]}|{size}", decode)


def decoded_folder(folder: Path, size: int) -> DecodedImages:
    """Every image of a folder at ``size``, in ``iter_images`` order; decoded once and cached
    (``cached_decode``), keyed by the folder's ``source_fingerprint`` (every file's path, size and
    modification time: a photo added, removed or replaced means a new decode) and the size."""
    spec = ImageSpec("folder", str(folder), folder)
    items = list(iter_images(spec))
    return cached_decode(f"{source_fingerprint(spec)[1]}|{size}", lambda: _decode_items(items, size, desc=folder.name))


def _decode_items(items: list[SourceImage], size: int, *, desc: str) -> DecodedImages:
    """Decode ``items`` at ``size`` with a progress bar (thousands of photos take a minute)."""
    import numpy as np
    from tqdm import tqdm

    labels, classes = _labelled(items)
    with tqdm(total=len(items), desc=f"decoding {desc} at {size} px", unit="img", leave=False,
              disable=len(items) < 2000) as bar:
        arrays = decode_all(items, size, progress=bar.update)
    return DecodedImages(np.stack(arrays), labels, classes)


def cached_decode(key: str, decode: Callable[[], DecodedImages]) -> DecodedImages:
    """``decode()`` once per ``key``: kept as .npy (read back without pickle) under
    ``cache_dir()/decoded/<sha256(key)[:16]>``, each file written atomically."""
    import numpy as np

    folder = cache_dir() / DECODED_CACHE_FOLDER / hashlib.sha256(key.encode()).hexdigest()[:16]
    paths = {name: folder / f"{name}.npy" for name in ("images", "labels")}
    classes_file = folder / "classes.txt"
    if all(p.is_file() for p in paths.values()) and classes_file.is_file():
        try:
            images = np.load(paths["images"], allow_pickle=False)
            labels = np.load(paths["labels"], allow_pickle=False)
            if images.ndim == 4 and len(images) == len(labels):
                return DecodedImages(images, labels, classes_file.read_text().splitlines())
        except (OSError, ValueError):
            pass  # a damaged cache entry is decoded again
    full = decode()
    for name, arr in (("images", full.images), ("labels", full.labels)):
        with atomic_path(paths[name]) as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
    with atomic_path(classes_file) as tmp:
        tmp.write_text("\n".join(full.classes))
    return full


@functools.lru_cache(maxsize=4)
def render_digits(size: int = 32) -> DecodedImages:
    """scikit-learn's 1,797 handwritten digits (8x8, 0..16) as RGB uint8 [N, size, size, 3]: grey
    scaled to 0..255, resized bilinearly, in the dataset's order. The one place digits are drawn."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images / 16.0 * 255).astype(np.uint8)  # [N, 8, 8]
    images = np.stack([
        np.asarray(Image.fromarray(g, mode="L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB"))
        for g in gray
    ])
    return DecodedImages(images, digits.target.astype(np.int64), [str(i) for i in range(10)])


def load_torchvision(name: str, split: str = "train", *, root: Path | None = None,
                     timeout_s: float | None = None) -> DecodedImages:
    """CIFAR-10/100 or STL-10 through torchvision at their own size; downloads when online.

    ``split``: ``train`` (for STL-10: train + unlabeled, labels -1) or ``test``. ``root``: where
    torchvision keeps its files (default ``cache_dir()/torchvision``). ``timeout_s``: a socket
    timeout for the download. Offline, ImageSourceError names the offline options.
    """
    import numpy as np

    if name not in TORCHVISION:
        raise ImageSourceError(f"{name}: not a torchvision set; expected one of {', '.join(TORCHVISION)}")
    if split not in ("train", "test"):
        raise ImageSourceError(f"{name}: split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else cache_dir() / "torchvision"
    try:
        import torchvision
    except ImportError as exc:
        raise ImageSourceError(f"{name}: needs torchvision (pip install 'ascl-hub[train]')") from exc
    previous = socket.getdefaulttimeout()
    if timeout_s is not None:
        socket.setdefaulttimeout(timeout_s)
    try:
        if name in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            ds = cls(str(root), train=split == "train", download=True)
            return DecodedImages(np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64), list(ds.classes))
        parts = ["train", "unlabeled"] if split == "train" else ["test"]
        sets = [torchvision.datasets.STL10(str(root), split=p, download=True) for p in parts]
        images = np.concatenate([s.data.transpose(0, 2, 3, 1) for s in sets])  # [N, 96, 96, 3]
        labels = np.concatenate([np.asarray(s.labels, dtype=np.int64) for s in sets])
        return DecodedImages(np.ascontiguousarray(images), labels, list(sets[0].classes))
    except (OSError, RuntimeError) as exc:
        raise ImageSourceError(
            f"{name}: could not load or download into {root} ({exc}). Offline? Use {OFFLINE_PREFIX}[:PATH] "
            f"(the CIFAR-10 JPEG tar), {DIGITS} or an image folder, or copy the torchvision files into {root}"
        ) from exc
    finally:
        if timeout_s is not None:
            socket.setdefaulttimeout(previous)


# ----------------------------------------------------------------------------- subsets


def per_class_subset(items: Iterable[SourceImage], per_class: int) -> list[SourceImage]:
    """The first ``per_class`` images of every label by key (``train/cat/0000.jpg`` first), labels in
    sorted order; unlabelled images are left out. For a small, balanced demo gallery."""
    groups: dict[str, list[SourceImage]] = {}
    for item in items:
        if item.label is not None:
            groups.setdefault(item.label, []).append(item)
    return [item for label in sorted(groups) for item in sorted(groups[label], key=lambda it: it.path)[:per_class]]
