"""The demo's actions as plain functions: read an upload, search, add; errors a person can act on.

The Gradio app is a thin shell over these, so they are tested without a browser, and every
failure (not an image, too large, server down, k out of range) becomes a ``UserError`` whose
message the UI shows as is, leaving the app ready for the next try.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ascl.demo.page_limits import upload_folder
from ascl.errors import AsclError
from ascl.images import MAX_IMAGE_BYTES, ImageError
from ascl.serving.online.gallery import GalleryService, Hit, public_metadata

MAX_K = 50
ANY_LABEL = "any"  # the label filter's choice that filters nothing
THUMBNAIL_SIDE = 256  # result images are shrunk to at most this side ...
MIN_THUMBNAIL_SIDE = 128  # ... and small ones (32-px thumbnails) enlarged to at least this, to be seen


class UserError(AsclError):
    """A failure the person at the screen can fix; ``str(e)`` is the message to show."""


@dataclass(frozen=True)
class SearchOutcome:
    """Ranked results and how long the backend took, in seconds."""

    results: list[Hit]
    seconds: float


def upload_bytes(value: Any) -> tuple[bytes, str]:
    """The bytes and file name of an uploaded image, from what Gradio passes unprocessed.

    Accepts Gradio's file payload (a dict with ``path`` or a ``data:`` URL, as sent by upload,
    webcam and clipboard), a file path, or raw bytes. Too-large images are refused before they
    are read into memory or decoded, in every form; a link to an image elsewhere is never fetched.
    """
    if value is None or value == "":
        raise UserError("No image yet: upload one, take a webcam picture, paste from the clipboard or click an example.")
    if isinstance(value, bytes | bytearray):
        data, name = bytes(value), "upload"
    elif isinstance(value, dict) and str(value.get("url") or "").startswith("data:") and not value.get("path"):
        data, name = _data_url_bytes(str(value["url"]), "clipboard.png"), "clipboard.png"
    elif isinstance(value, dict) and not value.get("path"):
        raise UserError("Links to images are not fetched; upload the image file itself.")
    elif isinstance(value, dict | str | Path):
        path = Path(value["path"] if isinstance(value, dict) else value)
        name = str(value.get("orig_name") or path.name) if isinstance(value, dict) else path.name
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise UserError(f"The upload {name!r} could not be read ({exc.strerror}); please upload it again.") from exc
        if size > MAX_IMAGE_BYTES:
            raise UserError(_too_large(name, size))
        data = path.read_bytes()
    else:
        raise UserError(f"Unexpected input of type {type(value).__name__}; upload an image file instead.")
    if len(data) > MAX_IMAGE_BYTES:
        raise UserError(_too_large(name, len(data)))
    return data, name


def _data_url_bytes(url: str, name: str) -> bytes:
    """The bytes of a ``data:`` URL, refused by its length before anything is decoded when they
    would be over the image limit."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise UserError("The pasted image could not be decoded; try saving it to a file and uploading it.")
    if header.endswith(";base64"):
        size = len(payload) * 3 // 4 - payload[-2:].count("=")  # what it decodes to (whitespace aside)
        if size > MAX_IMAGE_BYTES:
            raise UserError(_too_large(name, size))
        try:
            return base64.b64decode(payload, validate=False)
        except ValueError as exc:
            raise UserError("The pasted image could not be decoded; try saving it to a file and uploading it.") from exc
    if len(payload) > 3 * MAX_IMAGE_BYTES:  # percent-encoded: each byte is 1 to 3 characters
        raise UserError(_too_large(name, len(payload) // 3))
    return urllib.parse.unquote_to_bytes(payload)


def _too_large(name: str, size: int) -> str:
    return (f"{name!r} is {size / 2**20:.1f} MiB, over the {MAX_IMAGE_BYTES / 2**20:.0f} MiB limit; "
            "please resize or re-encode it (JPEG/PNG/WebP) and try again.")


def friendly_message(exc: BaseException, backend: GalleryService, name: str = "the image") -> str:
    """One sentence for the screen, from any exception a backend raises."""
    if isinstance(exc, UserError):
        return str(exc)
    text = str(exc)
    lowered = text.lower()
    if "not a readable image" in lowered or "empty input" in lowered:
        return f"{name!r} is not an image we can read. Please upload a JPEG, PNG or WebP picture."
    if isinstance(exc, ValueError) and lowered.startswith("a label"):
        return f"{text}."
    if isinstance(exc, ImageError) or ("limit" in lowered and "image" in lowered):
        detail = text.split(": ", 1)[-1]
        return f"{name!r} cannot be used: {detail}."
    down_signs = ("failed to connect", "unavailable", "connection refused", "socket closed", "deadline exceeded",
                  "not ready", "connect failed")
    if isinstance(exc, ConnectionError | TimeoutError) or any(sign in lowered for sign in down_signs):
        return (f"The search server is not answering ({backend.description}). Start it with 'ascl up' or "
                "'ascl serve', then try again.")
    first_line = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return f"The search failed: {first_line}"


def check_k(k: Any) -> int:
    """The number of results asked for, as an int in [1, MAX_K]."""
    try:
        value = int(k)
    except (TypeError, ValueError) as exc:
        raise UserError(f"k must be a whole number between 1 and {MAX_K}, got {k!r}") from exc
    if not 1 <= value <= MAX_K:
        raise UserError(f"k must be between 1 and {MAX_K}, got {value}")
    return value


def label_filter(label: str | None) -> dict[str, str] | None:
    """The search filter for a label chosen on the page: None for ``ANY_LABEL`` (or nothing)."""
    return None if label in (None, "", ANY_LABEL) else {"label": str(label)}


def search(backend: GalleryService, image: bytes, k: Any, name: str = "the image",
           label: str | None = None) -> SearchOutcome:
    """Search ``backend`` with encoded ``image`` (only entries labelled ``label``, unless it is
    ``ANY_LABEL`` or None); raises UserError with a friendly message."""
    count = check_k(k)
    start = time.perf_counter()
    try:
        results = backend.search(image, count, where=label_filter(label))
    except Exception as exc:
        raise UserError(friendly_message(exc, backend, name)) from exc
    return SearchOutcome(results, time.perf_counter() - start)


def add(backend: GalleryService, image: bytes, name: str, label: str | None = None) -> Hit:
    """Add ``image`` to the backend's gallery; raises UserError with a friendly message."""
    try:
        return backend.add(image, name=name, label=label or None)
    except Exception as exc:
        raise UserError(friendly_message(exc, backend, name)) from exc


def public_name(result: Hit) -> str:
    """The name of a result a visitor may see: its place in its gallery, never a path of this machine."""
    return str(public_metadata({"path": result.name})["path"])


def caption(result: Hit) -> str:
    """The caption under a result thumbnail: score, label and id."""
    return f"{result.score:.3f} · {result.label or 'unlabelled'} · #{result.id}"


def thumbnail(result: Hit, folder: Path | None = None) -> str:
    """A PNG file to show for ``result``: the gallery image shrunk to at most 256 px (enlarged to at
    least 128 px when it is smaller, so a 32-px thumbnail can be seen), or a grey tile when the image
    is not on this machine; in the page's upload folder (removed when it stops).

    Files, not in-memory images: Gradio copies a file into its cache atomically, while it rewrites
    an in-memory image's cache file on every response, so two quick searches returning the same
    result could hand the browser a half-written image. Thumbnails are written atomically too,
    keyed by the source's path, size and mtime, and reused.
    """
    from PIL import Image

    from ascl.atomic import atomic_path

    folder = folder or upload_folder() / "thumbnails"
    source = result.file
    try:
        stat = source.stat() if source is not None else None
    except OSError:
        stat = None
    key = "missing" if stat is None else hashlib.sha1(f"{source}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    out = folder / f"{key}.png"
    if out.is_file():
        return str(out)
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    if source is not None and stat is not None:
        try:
            with Image.open(source) as img:
                image = img.convert("RGB")
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            if max(image.size) < MIN_THUMBNAIL_SIDE:
                scale = MIN_THUMBNAIL_SIDE / max(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)),
                                     Image.Resampling.LANCZOS)
        except (OSError, ValueError, Image.DecompressionBombError):
            pass
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    return str(out)
