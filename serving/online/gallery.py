"""The gallery service: embed, search, add, remove and count, over Triton or in this process.

``GalleryService`` is the one interface to a searchable image gallery; everything outside
serving that searches or changes a gallery (the demo above all) talks to it and to the few
functions beside it here, never to the rest of ``ascl.serving``. Two implementations:

- ``TritonGallery``: a running ``ascl serve`` / ``ascl up`` over gRPC (the production path),
  plus the index folder the server reads, for writes. Its ``add`` waits until the server
  answers with the new id, so "findable at once" holds for the very next search.
- ``InProcessGallery``: the same ONNX file with ONNX Runtime and the same FAISS index in this
  process (no server: notebooks, tests, a laptop without Triton).

Both take encoded image bytes (what a browser uploads) and return ranked ``Hit`` lists (the
index's one hit type: id, score, metadata, and the label, name and file they give).
Their adds and removes are the collections layer's one writer (``ascl.serving.collections.changes``:
same bytes keep one id, the writer lock, a new index version), re-exported here.

Also here, so that a caller needs nothing else from serving to use a gallery: building an
index from a folder of images (``build_index``), reading an index (``index_exists``,
``index_manifest``, ``index_count``, ``index_records``, ``source_folders``) and the port check
(``check_ports_free``). Starting the service is the one serve path, ``ascl.serving.online.serve``.

This module imports only serving's own modules, ``ascl.export`` (runtime, cache) and core.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, overload

import numpy as np

from ascl.errors import FAILURE, AsclError
from ascl.serving.collections.changes import (
    ADDED_FOLDER,
    MAX_LABEL_CHARS,
    Added,
    LabelError,
    Removed,
    add_image_bytes,
    add_images,
    clean_label,
    embed_encoded,
    files_folder,
    remove_images,
)
from ascl.serving.collections.filters import Where
from ascl.serving.collections.index import (
    Hit,
    IndexFileError,
    IndexSpec,
    VectorIndex,
    as_spec,
    ensure_index_model,
    index_count,
    index_exists,
    open_index,
    public_metadata,
    read_info,
)
from ascl.serving.online.ports import check_ports_free
from ascl.serving.online.server import PortInUseError, ServerError

__all__ = [
    "ADDED_FOLDER", "MAX_LABEL_CHARS", "Added", "AddNotServedError", "GalleryService", "Hit", "InProcessGallery",
    "IndexFileError", "LabelError", "NoIndexFolderError", "PortInUseError", "Removed", "ServerError",
    "IndexSpec", "TritonGallery", "add_image_bytes", "add_images", "as_spec", "build_index", "check_ports_free",
    "clean_label", "files_folder", "index_count", "index_exists", "index_manifest", "index_records", "public_metadata",
    "remove_images",
    "source_folders",
]

class NoIndexFolderError(AsclError, RuntimeError):
    """A change was asked of a gallery that was not given the index folder it serves."""


class AddNotServedError(AsclError, TimeoutError):
    """The server did not pick up a new index version in time."""

    exit_code = FAILURE


class GalleryService(Protocol):
    """Embeds and searches with encoded images, and adds images to and removes them from a gallery."""

    description: str

    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        """Unit embeddings [N, D] of encoded images (raises for bytes that are no image)."""
        ...

    @overload
    def search(self, images: bytes, k: int, where: Where | None = None) -> list[Hit]: ...
    @overload
    def search(self, images: Sequence[bytes], k: int, where: Where | None = None) -> list[list[Hit]]: ...
    def search(self, images: bytes | Sequence[bytes], k: int,
               where: Where | None = None) -> list[Hit] | list[list[Hit]]:
        """The ``k`` nearest gallery entries of one image (a ranked list, best first) or of each of
        several (one ranked list each); ``k`` is clamped to the gallery size. ``where`` keeps only
        entries whose metadata pass it (``{"label": "cat"}``; a list of values: any of them; several
        fields: all), inside FAISS: still ``k`` results when ``k`` entries match; FilterError for an
        unknown field."""
        ...

    def labels(self) -> list[str]:
        """The labels the gallery's entries carry, sorted (empty when it cannot tell)."""
        ...

    def add(self, image: bytes, *, name: str, label: str | None = None) -> Hit:
        """Add ``image`` to the gallery; it is found by the next search. Returns its record.
        The same bytes added again keep their first id (and label)."""
        ...

    def remove(self, ids: Iterable[int]) -> int:
        """Remove entries by id; they are gone from the next search. Returns how many were there."""
        ...

    def count(self) -> int:
        """How many images the gallery holds (-1 when it cannot tell)."""
        ...


def _labels(records: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({str(m["label"]) for m in records if m.get("label") is not None})


# ---------------------------------------------------------------------------- the two implementations


class _Gallery:
    """What both implementations share: ``search`` for one image or many."""

    description: str

    def _search(self, images: list[bytes], k: int, where: Where | None) -> list[list[Hit]]:
        raise NotImplementedError

    @overload
    def search(self, images: bytes, k: int, where: Where | None = None) -> list[Hit]: ...
    @overload
    def search(self, images: Sequence[bytes], k: int, where: Where | None = None) -> list[list[Hit]]: ...
    def search(self, images: bytes | Sequence[bytes], k: int,
               where: Where | None = None) -> list[Hit] | list[list[Hit]]:
        """The ``k`` nearest gallery entries of ``images`` (one encoded image, or a list), best first,
        among those passing ``where`` (``ascl.serving.collections.filters``)."""
        if isinstance(images, bytes | bytearray):
            return self._search([bytes(images)], k, where)[0]
        return self._search(list(images), k, where)


class InProcessGallery(_Gallery):
    """ONNX Runtime + FAISS in this process; picks up new index versions written by others."""

    def __init__(self, onnx_path: str | Path, index_dir: IndexSpec, *, threads: int = 0) -> None:
        from ascl.export.runtime import OnnxEmbedder

        self.embedder = OnnxEmbedder(onnx_path, threads=threads)
        self.index_dir = as_spec(index_dir)
        self.index = open_index(self.index_dir)
        if self.index.dim != self.embedder.embedding_dim:
            raise IndexFileError(
                f"{self.index_dir} holds {self.index.dim}-d vectors but {onnx_path} makes "
                f"{self.embedder.embedding_dim}-d embeddings; build the index with the same model"
            )
        ensure_index_model(self.index_dir, onnx_path)
        self._lock = threading.Lock()
        self.description = f"in-process ONNX Runtime ({Path(onnx_path).name}) + index {self.index_dir}"

    def _current(self) -> VectorIndex:
        """The index, reloaded when a newer version was written (a cheap check per call)."""
        with self._lock:
            self.index = self.index.refreshed()
            return self.index

    def embed(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """Encoded images -> [N, D] unit embeddings (raises ImageError, naming the image, for bad input)."""
        return embed_encoded(self.embedder, list(images), names)

    def _search(self, images: list[bytes], k: int, where: Where | None) -> list[list[Hit]]:
        index = self._current()
        index.check_where(where)  # a bad filter fails before the images are embedded
        queries = self.embed(images)  # [Q, D]
        return index.hits(queries, k, where)  # k is clamped to the index size

    def labels(self) -> list[str]:
        return _labels(self._current().records().values())

    def add(self, image: bytes, *, name: str, label: str | None = None) -> Hit:
        return add_images(self.index_dir, [(name, image)], self.embed, label=label).results[0]

    def remove(self, ids: Iterable[int]) -> int:
        return len(remove_images(self.index_dir, ids).results)

    def count(self) -> int:
        return int(self._current().count())


SETTLE_S = 0.8  # > the search models' 0.5 s index poll: every instance has looked since the first answered


class TritonGallery(_Gallery):
    """A running Triton server (``ascl serve`` / ``ascl up``) over gRPC.

    ``index_dir`` is the folder the server's search model reads; only ``add``, ``remove`` and
    ``count`` need it. Changes are written there and waited for until the server answers with them.
    """

    def __init__(self, url: str, index_dir: IndexSpec | None = None, *, add_timeout_s: float = 30.0) -> None:
        from ascl.serving.online.client import Client

        self.url = url
        self.client = Client(url)
        self.index_dir = as_spec(index_dir) if index_dir else None
        self.add_timeout_s = add_timeout_s
        self.description = f"Triton at {url}"
        self._galleries: dict[str, list[str]] = {}  # gallery name (what the server sends) -> its folders here
        self._galleries_version: Any = None

    def embed(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """[N, D] unit embeddings computed by the server (``names`` are not sent)."""
        return np.asarray(self.client.embed(list(images)), dtype=np.float32)

    def _search(self, images: list[bytes], k: int, where: Where | None) -> list[list[Hit]]:
        hits = self.client.search(images, k=k, where=where)  # the server clamps k to the index size
        return hits if self.index_dir is None else [[self._with_file(h) for h in row] for row in hits]

    def _with_file(self, hit: Hit) -> Hit:
        """``hit`` with its gallery's folder on this machine, so that ``hit.file`` finds the image: the
        server sends a gallery's name only, never its path (``public_metadata``)."""
        name = hit.metadata.get("source")
        if not isinstance(name, str) or hit.file is not None:
            return hit
        for folder in self._gallery_folders().get(name, []):
            if (Path(folder) / hit.name).is_file():
                return Hit(hit.id, hit.score, {**hit.metadata, "source": folder})
        return hit

    def _gallery_folders(self) -> dict[str, list[str]]:
        """Gallery name -> the source folders of the served index with that name (read once per version)."""
        assert self.index_dir is not None
        version = read_info(self.index_dir).get("version")
        if version != self._galleries_version:
            folders: dict[str, list[str]] = {}
            for source in sorted({str(m.get("source")) for m in open_index(self.index_dir).records().values()}):
                folders.setdefault(str(public_metadata({"source": source})["source"]), []).append(source)
            self._galleries, self._galleries_version = folders, version
        return self._galleries

    def labels(self) -> list[str]:
        """The labels in the served index folder (read here; empty without ``index_dir``)."""
        if self.index_dir is None:
            return []
        return _labels(open_index(self.index_dir).records().values())

    def _folder(self) -> IndexSpec:
        if self.index_dir is None:
            raise NoIndexFolderError("adding or removing images needs the served index folder; pass it "
                                     "(in the demo: start it with --index IDX)")
        return self.index_dir

    def add(self, image: bytes, *, name: str, label: str | None = None) -> Hit:
        added = add_images(self._folder(), [(name, image)], self.embed, label=label)
        result = added.results[0]
        if added.new[0]:
            # k > 1 because an identical image already in the gallery ties with the new one
            self._wait_until([image], lambda ids: result.id in ids, k=min(10, max(1, added.total - 1)))
        return result

    def remove(self, ids: Iterable[int]) -> int:
        """Remove ``ids``; waits until searches with the removed images (where their files are on
        this machine) no longer return them."""
        gone = remove_images(self._folder(), ids).results
        probes = [r.file.read_bytes() for r in gone if r.file is not None and r.file.is_file()]
        if probes:
            dropped = {r.id for r in gone}
            self._wait_until(probes, lambda found: not (found & dropped), k=10)
        return len(gone)

    def _wait_until(self, probes: list[bytes], done: Callable[[set[int]], bool], k: int) -> None:
        """Poll searches with ``probes`` until ``done(ids returned)`` holds, and keeps holding for
        ``SETTLE_S``: each instance of the search model reloads new index versions by itself (a
        watcher polling every 0.5 s), so the first answer with the change may come from one
        instance while another still serves the old version."""
        deadline = time.monotonic() + self.add_timeout_s
        held_since: float | None = None
        while True:
            found = {h.id for hits in self.client.search(probes, k=k) for h in hits}
            now = time.monotonic()
            held_since = (held_since or now) if done(found) else None
            if held_since is not None and now - held_since >= SETTLE_S:
                return
            if now > deadline:
                raise AddNotServedError(
                    f"the server at {self.url} did not pick up the new index version within {self.add_timeout_s:.0f} s"
                )
            time.sleep(0.1)

    def count(self) -> int:
        if self.index_dir is None:
            return -1
        return int(read_info(self.index_dir).get("count", -1))


# ---------------------------------------------------------------------------- index folders, ports, the service


def build_index(onnx_path: str | Path, images: str | Path, index_dir: IndexSpec, *, factory: str = "auto") -> int:
    """Embed every image under ``images`` with ``onnx_path`` into the index at ``index_dir`` (a new one,
    or the new images added to an existing one). Unreadable images are skipped with a warning (a
    gallery folder is rarely perfectly clean). Returns the number of images in the index."""
    from ascl.serving.collections import build

    return build.build_index(onnx_path, str(images), index_dir, factory=factory).total


def index_manifest(index_dir: IndexSpec) -> dict[str, Any]:
    """What an index records about itself (IndexFileError, saying what to do, when it is not one)."""
    return read_info(index_dir)


def index_records(index_dir: IndexSpec) -> list[Hit]:
    """Every entry of the index ``index_dir``, by id (score 0)."""
    records = open_index(index_dir).records()
    return [Hit(i, 0.0, records[i]) for i in sorted(records)]


def source_folders(index_dir: IndexSpec) -> list[Path]:
    """The folders on this machine that the index's images live in."""
    sources = {str(m.get("source")) for m in open_index(index_dir).records().values()}
    return sorted(Path(s) for s in sources if Path(s).is_dir())
