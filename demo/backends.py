"""What the demo searches with: a small protocol and its two implementations.

``TritonBackend`` talks to a running ``ascl serve`` / ``ascl up`` over gRPC (the production
path); ``InProcessBackend`` runs the same ONNX file with ONNX Runtime and the same FAISS index
in this process (no server needed: notebooks, tests, a laptop without Triton). Both take
encoded image bytes, exactly what a browser uploads, and return ranked ``Result`` records.

Adding an image writes a new version of the index folder (``ascl.serving.index``); the Triton
search model reloads it on its own, and ``TritonBackend.add`` waits until the server answers
with the new id so that "findable at once" holds for the very next search.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ascl.images import decode_image

ADDED_FOLDER = "added"  # inside the index folder: the images added through the demo


@dataclass(frozen=True)
class Result:
    """One ranked hit as the demo shows it."""

    id: int
    score: float  # cosine similarity, higher is closer
    label: str | None
    name: str  # path relative to its gallery, for the caption
    file: Path | None  # the image on this machine, when it can be found

    @classmethod
    def from_metadata(cls, id_: int, score: float, meta: dict[str, Any]) -> Result:
        name = str(meta.get("path", id_))
        source = meta.get("source")
        file = Path(source) / name if isinstance(source, str) and Path(source).is_dir() else None
        label = meta.get("label")
        return cls(int(id_), float(score), None if label is None else str(label), name, file)


class SearchBackend(Protocol):
    """Searches a gallery with an encoded image and adds images to it."""

    description: str

    def search(self, image: bytes, k: int) -> list[Result]:
        """The ``k`` nearest gallery images to ``image`` (encoded bytes), best first."""
        ...

    def add(self, image: bytes, *, name: str, label: str | None = None) -> Result:
        """Add ``image`` to the gallery; it is found by the next search. Returns its record."""
        ...

    def count(self) -> int:
        """How many images the gallery holds."""
        ...


MAX_LABEL_CHARS = 64


def clean_label(label: str | None) -> str | None:
    """A label as it is stored: printable, trimmed, at most ``MAX_LABEL_CHARS``; ValueError otherwise."""
    if label is None:
        return None
    text = " ".join(label.split())  # newlines, tabs and runs of spaces become single spaces
    if not text:
        return None
    if len(text) > MAX_LABEL_CHARS:
        raise ValueError(f"a label may have at most {MAX_LABEL_CHARS} characters, got {len(text)}")
    if not text.isprintable():
        raise ValueError("a label may contain printable characters only")
    return text


class IndexWriter:
    """Appends images to an index folder: saves the file, embeds, writes a new index version.

    Each add is one change under the index's writer lock (``ascl.serving.index.writer_lock``),
    so it takes turns with ``ascl index add/remove`` instead of overwriting their versions; an
    image already in the index (same bytes) keeps its id.
    """

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = Path(index_dir)
        self.added_dir = self.index_dir / ADDED_FOLDER
        self.count = 0  # vectors in the index after the last add

    def known(self, image: bytes) -> Result | None:
        """The stored record of ``image`` when these exact bytes are indexed already."""
        from ascl.serving.index import GalleryIndex

        sha1 = hashlib.sha1(image).hexdigest()
        index = GalleryIndex.load(self.index_dir)
        self.count = index.ntotal
        for i, meta in index.metadata.items():
            if meta.get("sha1") == sha1:
                return Result.from_metadata(i, 1.0, meta)
        return None

    def add(self, image: bytes, vector: np.ndarray, *, name: str, label: str | None) -> Result:
        """vector: [D] unit embedding of ``image``. Returns the new record (or the existing one)."""
        from ascl.atomic import atomic_write_bytes
        from ascl.serving.index import GalleryIndex, writer_lock

        label = clean_label(label)
        sha1 = hashlib.sha1(image).hexdigest()
        suffix = Path(name).suffix.lower() or ".png"
        file_name = f"{sha1[:16]}{suffix}"
        with writer_lock(self.index_dir, who="the demo's add"):
            index = GalleryIndex.load(self.index_dir)
            for i, meta in index.metadata.items():
                if meta.get("sha1") == sha1:
                    self.count = index.ntotal
                    return Result.from_metadata(i, 1.0, meta)
            atomic_write_bytes(self.added_dir / file_name, image)
            record = {"path": file_name, "label": label, "size": len(image),
                      "source": str(self.added_dir.resolve()), "sha1": sha1, "original_name": name[:200]}
            (new_id,) = index.add(vector.reshape(1, -1).astype(np.float32), [record]).tolist()
            index.save(self.index_dir)
            self.count = index.ntotal
        return Result(int(new_id), 1.0, label, file_name, self.added_dir / file_name)


class InProcessBackend:
    """ONNX Runtime + FAISS in this process; picks up new index versions written by others."""

    def __init__(self, onnx_path: str | Path, index_dir: str | Path, *, threads: int = 0) -> None:
        from ascl.export.runtime import OnnxEmbedder
        from ascl.serving.index import GalleryIndex

        self.embedder = OnnxEmbedder(onnx_path, threads=threads)
        self.index_dir = Path(index_dir)
        self.index = GalleryIndex.load(self.index_dir)
        if self.index.dim != self.embedder.embedding_dim:
            raise ValueError(
                f"{self.index_dir} holds {self.index.dim}-d vectors but {onnx_path} makes "
                f"{self.embedder.embedding_dim}-d embeddings; build the index with the same model"
            )
        self.writer = IndexWriter(self.index_dir)
        self._lock = threading.Lock()
        self.description = f"in-process ONNX Runtime ({Path(onnx_path).name}) + FAISS ({self.index_dir})"

    def _current(self) -> Any:
        """The index, reloaded when a newer version was written (a manifest read per call)."""
        from ascl.serving.index import GalleryIndex, manifest_version

        with self._lock:
            if manifest_version(self.index_dir) != self.index.version:
                self.index = GalleryIndex.load(self.index_dir)
            return self.index

    def embed(self, image: bytes) -> np.ndarray:
        """Encoded image -> [D] unit embedding (raises ImageError for bad input)."""
        pixels = decode_image(image, self.embedder.image_size)  # [S, S, 3] uint8
        return self.embedder.embed(pixels[None])[0]  # [D]

    def search(self, image: bytes, k: int) -> list[Result]:
        query = self.embed(image)[None]  # [1, D]
        index = self._current()
        (hits,) = index.hits(query, k)  # k is clamped to the index size
        return [Result.from_metadata(h.id, h.score, h.metadata) for h in hits]

    def add(self, image: bytes, *, name: str, label: str | None = None) -> Result:
        label = clean_label(label)
        return self.writer.known(image) or self.writer.add(image, self.embed(image), name=name, label=label)

    def count(self) -> int:
        return int(self._current().ntotal)


class TritonBackend:
    """A running Triton server (``ascl serve`` / ``ascl up``) over gRPC.

    ``index_dir`` is the folder the server's search model reads; only ``add`` needs it.
    """

    def __init__(self, url: str, index_dir: str | Path | None = None, *, add_timeout_s: float = 30.0) -> None:
        from ascl.serving import Client

        self.url = url
        self.client = Client(url)
        self.index_dir = Path(index_dir) if index_dir else None
        self.writer = IndexWriter(self.index_dir) if self.index_dir else None
        self.add_timeout_s = add_timeout_s
        self.description = f"Triton at {url}"

    def search(self, image: bytes, k: int) -> list[Result]:
        (hits,) = self.client.search([image], k=k)  # the server clamps k to the index size
        return [Result.from_metadata(h.id, h.score, h.metadata) for h in hits]

    def add(self, image: bytes, *, name: str, label: str | None = None) -> Result:
        if self.writer is None:
            raise RuntimeError("adding images needs the served index folder; start the demo with --index IDX")
        label = clean_label(label)
        known = self.writer.known(image)
        if known is not None:
            return known
        vector = np.asarray(self.client.embed([image]))[0]  # [D]
        result = self.writer.add(image, vector, name=name, label=label)
        self._wait_until_served(image, result.id, k=min(10, max(1, self.writer.count - 1)))
        return result

    def _wait_until_served(self, image: bytes, new_id: int, k: int) -> None:
        """Poll until the server's search sees ``new_id`` (it reloads new index versions itself).

        ``k`` > 1 because an identical image already in the gallery ties with the new one.
        """
        deadline = time.monotonic() + self.add_timeout_s
        while True:
            (hits,) = self.client.search([image], k=k)
            if any(h.id == new_id for h in hits):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the server at {self.url} did not pick up the new index version within {self.add_timeout_s:.0f} s"
                )
            time.sleep(0.1)

    def count(self) -> int:
        if self.index_dir is None:
            return -1
        from ascl.serving.index import read_manifest

        return int(read_manifest(self.index_dir).get("count", -1))
