"""Image decoding shared by index building, serving and the demo.

One rule everywhere: decode, convert to RGB, resize the shorter side to ``size`` (bilinear),
centre-crop to ``size x size``, return uint8 HWC. Inputs are untrusted: size limits and clear
errors come first.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # 20 MiB of encoded data per image
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 megapixels after decode
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(ValueError):
    """An input that is not a usable image; the message says why and what to do."""


def to_rgb_square(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> uint8 [size, size, 3]: shorter side resized to ``size``, centre crop."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes, size: int, *, name: str = "image", max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
    """Encoded bytes (JPEG/PNG/WebP/...) -> uint8 [size, size, 3].

    Raises ImageError naming ``name`` for empty, oversized, corrupt or truncated input.
    """
    if not data:
        raise ImageError(f"{name}: empty input, expected encoded image bytes (JPEG, PNG or WebP)")
    if len(data) > max_bytes:
        raise ImageError(
            f"{name}: {len(data) / 2**20:.1f} MiB is larger than the {max_bytes / 2**20:.0f} MiB limit; "
            "resize or re-encode the image first"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageError(
                        f"{name}: {img.width}x{img.height} pixels is over the {MAX_IMAGE_PIXELS} pixel limit"
                    )
                img.load()
                return to_rgb_square(img, size)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: not a readable image ({exc}); expected JPEG, PNG or WebP bytes") from exc


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Read and decode an image file -> uint8 [size, size, 3]; errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror})") from exc
    return decode_image(data, size, name=str(path))


def list_images(folder: str | Path) -> list[Path]:
    """All image files under ``folder`` (recursive), sorted for reproducible order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
