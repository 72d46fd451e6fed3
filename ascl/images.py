"""Image decoding shared by index building, serving and the demo.

One rule everywhere: decode, take the centred square of side min(width, height), resize it to
``size x size`` (bilinear, antialiased), convert to RGB, return uint8 HWC. Cropping before
scaling keeps every intermediate at most as large as the source and the output exactly
``size x size``, whatever the aspect ratio. Inputs are untrusted: size limits and clear
errors come first, and error messages never echo object reprs or server paths.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ascl.errors import AsclError, public_message

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # 20 MiB of encoded data per image
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # 64 MiB of encoded data per request, all its images together
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 megapixels after decode
MAX_ASPECT_RATIO = 100  # longer side / shorter side; beyond this it is not a picture of anything
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit (and 32-bit int) greyscale
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(AsclError, ValueError):
    """An input that is not a usable image; the message says why and what to do."""


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale scaled to 8 bits (PIL's own convert clips everything above 255 to white)."""
    if image.mode not in HIGH_BIT_MODES:
        return image
    values = np.asarray(image, dtype=np.uint32)  # [H, W]
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")


def to_rgb_square(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> uint8 [size, size, 3]: the centred square of side min(w, h), resized to ``size``."""
    w, h = image.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)  # centred square, source pixels
    image = to_8bit(image)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGBA" if "A" in image.mode or image.mode == "P" else "RGB")
    if (w, h) != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, size: int, *, name: str = "image", max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
    """Encoded bytes (JPEG/PNG/WebP/...) -> uint8 [size, size, 3].

    Raises ImageError naming ``name`` for empty, oversized, corrupt or truncated input.
    """
    return decode_image_sized(data, size, name=name, max_bytes=max_bytes)[0]


def decode_image_sized(data: bytes, size: int, *, name: str = "image", max_bytes: int = MAX_IMAGE_BYTES
                       ) -> tuple[np.ndarray, tuple[int, int]]:
    """``decode_image`` and the original (width, height) of the image, before the square crop."""
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
                check_dimensions(img.width, img.height, name)
                img.load()
                return to_rgb_square(img, size), (img.width, img.height)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's own check, in open()
        raise ImageError(f"{name}: more pixels than the {MAX_IMAGE_PIXELS} pixel limit; "
                         "resize the image first") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a readable image (unknown format); expected JPEG, PNG or WebP bytes") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable image ({public_message(str(exc), 200)}); "
                         "expected JPEG, PNG or WebP bytes") from exc


def check_dimensions(width: int, height: int, name: str = "image") -> None:
    """Refuse, before decoding, images too large to decode or too elongated to be a picture."""
    if width < 1 or height < 1:
        raise ImageError(f"{name}: {width}x{height} pixels is empty")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: {width}x{height} pixels is over the {MAX_IMAGE_PIXELS} pixel limit")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(f"{name}: {width}x{height} pixels has an aspect ratio of {ratio:.0f}:1, beyond the "
                         f"{MAX_ASPECT_RATIO}:1 limit; crop the part to search with first")


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
