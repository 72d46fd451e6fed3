"""The gallery service: embed, search, add, remove and count, over Triton or in this process.

``GalleryService`` is the one interface to a searchable image gallery; everything outside
serving that searches or changes a gallery (the demo above all) talks to it and to the few
functions beside it here, never to the rest of ``ascl.serving``. Two implementations:

- ``TritonGallery``: a running ``ascl serve`` / ``ascl up`` over gRPC (the production path),
  plus the index folder the server reads, for writes. Its ``add`` waits until the server
  answers with the new id, so "findable at once" holds for the very next search.
- ``InProcessGallery``: the same ONNX file with ONNX Runtime and the same FAISS index in this
  process (no server: notebooks, tests, a laptop without Triton).

Both take encoded image bytes (what a browser uploads) and return ranked ``Result`` records.
Adding images is written once, in ``add_images``: the content hash (sha1) dedupes (the same
bytes keep one id), the file is saved under the index's ``added/`` folder, and the change is one
new index version written under the index's writer lock, taking turns with ``ascl index
build/add/remove``. The served search model reloads new versions by itself.

Also here, so that a caller needs nothing else from serving: building an index from a folder
of images (``build_index``), reading an index folder (``index_exists``, ``index_manifest``,
``index_count``, ``index_records``, ``source_folders``), checking ports (``check_ports_free``)
and starting the search service (``start_service``).

This module imports only serving's own modules, ``ascl.export.runtime`` and core.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, overload

import numpy as np

from ascl.atomic import atomic_write_bytes
from ascl.errors import FAILURE, AsclError
from ascl.images import decode_image
from ascl.serving.filters import Where
from ascl.serving.index import (
    MANIFEST,
    GalleryIndex,
    IndexConflictError,
    IndexFileError,
    manifest_version,
    read_manifest,
    writer_lock,
)
from ascl.serving.server import PortInUseError, ServerError
from ascl.serving.server import check_ports_free as _check_server_ports

if TYPE_CHECKING:
    from ascl.models import ModelRef

__all__ = [
    "ADDED_FOLDER", "MAX_LABEL_CHARS", "Added", "AddNotServedError", "GalleryService", "InProcessGallery",
    "IndexFileError", "LabelError", "NoIndexFolderError", "PortInUseError", "Removed", "Result", "RunningService",
    "ServerError", "TritonGallery", "add_image_bytes", "add_images", "build_index", "check_ports_free",
    "clean_label", "describe_precision", "index_count", "index_exists", "index_manifest", "index_records",
    "model_onnx", "remove_images", "source_folders", "start_service",
]

ADDED_FOLDER = "added"  # inside the index folder: the images added through the service
MAX_LABEL_CHARS = 64
Embed = Callable[[list[bytes], list[str]], np.ndarray]  # (images, their names) -> [N, D] unit embeddings


class LabelError(AsclError, ValueError):
    """A label that cannot be stored (too long, not printable)."""


class NoIndexFolderError(AsclError, RuntimeError):
    """A change was asked of a gallery that was not given the index folder it serves."""


class AddNotServedError(AsclError, TimeoutError):
    """The server did not pick up a new index version in time."""

    exit_code = FAILURE


@dataclass(frozen=True)
class Result:
    """One gallery entry as a search returns it."""

    id: int
    score: float  # cosine similarity, higher is closer
    label: str | None
    name: str  # path relative to its gallery, for a caption
    file: Path | None  # the image on this machine, when it can be found

    @classmethod
    def from_metadata(cls, id_: int, score: float, meta: dict[str, Any]) -> Result:
        name = str(meta.get("path", id_))
        source = meta.get("source")
        file = Path(source) / name if isinstance(source, str) and Path(source).is_dir() else None
        label = meta.get("label")
        return cls(int(id_), float(score), None if label is None else str(label), name, file)


class GalleryService(Protocol):
    """Embeds and searches with encoded images, and adds images to and removes them from a gallery."""

    description: str

    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        """Unit embeddings [N, D] of encoded images (raises for bytes that are no image)."""
        ...

    @overload
    def search(self, images: bytes, k: int, where: Where | None = None) -> list[Result]: ...
    @overload
    def search(self, images: Sequence[bytes], k: int, where: Where | None = None) -> list[list[Result]]: ...
    def search(self, images: bytes | Sequence[bytes], k: int,
               where: Where | None = None) -> list[Result] | list[list[Result]]:
        """The ``k`` nearest gallery entries of one image (a ranked list, best first) or of each of
        several (one ranked list each); ``k`` is clamped to the gallery size. ``where`` keeps only
        entries whose metadata pass it (``{"label": "cat"}``; a list of values: any of them; several
        fields: all), inside FAISS: still ``k`` results when ``k`` entries match; FilterError for an
        unknown field."""
        ...

    def labels(self) -> list[str]:
        """The labels the gallery's entries carry, sorted (empty when it cannot tell)."""
        ...

    def add(self, image: bytes, *, name: str, label: str | None = None) -> Result:
        """Add ``image`` to the gallery; it is found by the next search. Returns its record.
        The same bytes added again keep their first id (and label)."""
        ...

    def remove(self, ids: Iterable[int]) -> int:
        """Remove entries by id; they are gone from the next search. Returns how many were there."""
        ...

    def count(self) -> int:
        """How many images the gallery holds (-1 when it cannot tell)."""
        ...


def clean_label(label: str | None) -> str | None:
    """A label as it is stored: printable, trimmed, at most ``MAX_LABEL_CHARS``; LabelError otherwise."""
    if label is None:
        return None
    text = " ".join(label.split())  # newlines, tabs and runs of spaces become single spaces
    if not text:
        return None
    if len(text) > MAX_LABEL_CHARS:
        raise LabelError(f"a label may have at most {MAX_LABEL_CHARS} characters, got {len(text)}")
    if not text.isprintable():
        raise LabelError("a label may contain printable characters only")
    return text


# ---------------------------------------------------------------------------- writing an index


@dataclass(frozen=True)
class Added:
    """What ``add_images`` did: one record and one "added now?" flag per item, and the index after."""

    results: list[Result]
    new: list[bool]  # False: these bytes were indexed already (or came earlier in the same call)
    total: int  # vectors in the index afterwards
    version: int  # the index version afterwards


def add_images(index_dir: str | Path, items: Sequence[tuple[str, bytes]], embed: Embed, *,
               label: str | None = None, who: str = "a gallery add",
               on_wait: Callable[[str], None] | None = None) -> Added:
    """Add encoded images (name, bytes) to the index in ``index_dir``: the one way to add an upload.

    Images whose bytes are indexed already keep their id and are not embedded again; the others
    are embedded with ``embed`` (outside the lock: it can be a round trip to a server), saved as
    ``added/<sha1[:16]><suffix>`` and added in one new index version under the writer lock,
    skipping any that another writer added meanwhile. Nothing is written when ``embed`` raises
    (ImageError for bytes that are no image).
    """
    index_dir = Path(index_dir)
    label = clean_label(label)
    keys = [hashlib.sha1(data).hexdigest() for _, data in items]
    known = GalleryIndex.load(index_dir).known_keys()
    todo: dict[str, int] = {}  # sha1 -> first item with these bytes, among those not indexed yet
    for j, key in enumerate(keys):
        if key not in known and key not in todo:
            todo[key] = j
    vectors = embed([items[j][1] for j in todo.values()], [items[j][0] for j in todo.values()]) if todo else None
    added_dir = index_dir / ADDED_FOLDER
    with writer_lock(index_dir, who=who, on_wait=on_wait):
        index = GalleryIndex.load(index_dir)
        now_known = index.known_keys()  # another writer may have added some meanwhile
        if any(key not in now_known and key not in todo for key in keys):
            raise IndexConflictError(f"{index_dir}: an image of this add was removed from the index meanwhile; "
                                     "nothing was written: run it again")
        fresh = [(key, j) for key, j in todo.items() if key not in now_known]
        if fresh:
            position = {key: p for p, key in enumerate(todo)}
            records = []
            for key, j in fresh:
                name, data = items[j]
                file_name = f"{key[:16]}{Path(name).suffix.lower() or '.png'}"
                atomic_write_bytes(added_dir / file_name, data)
                records.append({"path": file_name, "label": label, "size": len(data),
                                "source": str(added_dir.resolve()), "sha1": key, "original_name": name[:200]})
            assert vectors is not None
            index.add_new(np.asarray(vectors)[[position[key] for key, _ in fresh]], records)
            version = index.save(index_dir)
        else:
            version = index.version
        by_key = {str(m["sha1"]): i for i, m in index.metadata.items() if "sha1" in m}
    fresh_keys = {key for key, _ in fresh}
    results = [Result.from_metadata(by_key[key], 1.0, index.metadata[by_key[key]]) for key in keys]
    new = [key in fresh_keys and todo[key] == j for j, key in enumerate(keys)]
    return Added(results, new, index.ntotal, version)


def add_image_bytes(out: str | Path, onnx_path: str | Path, items: list[tuple[str, bytes]], *,
                    label: str | None = None) -> list[int]:
    """Add encoded images (name, bytes) to the index in ``out`` with the ONNX model; returns their ids.

    ``add_images`` with an ONNX Runtime embedder: an image already indexed (same bytes) keeps
    its id; a served index picks the new version up within a second.
    """
    from ascl.export.runtime import OnnxEmbedder

    embedder = OnnxEmbedder(onnx_path)
    return [r.id for r in add_images(out, items, lambda images, names: _embed_locally(embedder, images, names),
                                     label=label, who="add_image_bytes", on_wait=_say).results]


@dataclass(frozen=True)
class Removed:
    """What ``remove_images`` did: the records it removed and the index version afterwards."""

    results: list[Result]
    version: int


def remove_images(index_dir: str | Path, ids: Iterable[int], *, paths: Iterable[str] = (),
                  who: str = "a gallery remove", on_wait: Callable[[str], None] | None = None,
                  only_if_present: Iterable[int] = ()) -> Removed:
    """Remove entries by id or by stored path in one new index version, under the writer lock
    (``ascl index remove``, ``ascl dedup --drop`` and the gallery services). Nothing is written
    when none is there, nor (IndexConflictError) when an id of ``only_if_present`` (what the caller
    keeps in their place, e.g. a duplicate's original) is no longer indexed."""
    index_dir = Path(index_dir)
    with writer_lock(index_dir, who=who, on_wait=on_wait):
        index = GalleryIndex.load(index_dir)
        gone_meanwhile = sorted({int(i) for i in only_if_present} - set(index.metadata))
        if gone_meanwhile:
            raise IndexConflictError(f"{index_dir}: id {gone_meanwhile[0]}, which this removal keeps, was removed "
                                     "meanwhile by another writer; nothing was written: run it again")
        wanted = {int(i) for i in ids} | {i for i, m in index.metadata.items() if m.get("path") in set(paths)}
        gone = [Result.from_metadata(i, 0.0, index.metadata[i]) for i in sorted(wanted) if i in index.metadata]
        index.remove(r.id for r in gone)
        version = index.save(index_dir) if gone else index.version
    return Removed(gone, version)


def _embed_locally(embedder: Any, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
    """Encoded images -> [N, D] unit embeddings with an OnnxEmbedder (ImageError names the bad one)."""
    names = list(names) if names is not None else [f"image {i}" if len(images) > 1 else "image"
                                                    for i in range(len(images))]
    if not images:
        return np.zeros((0, embedder.embedding_dim), np.float32)
    pixels = np.stack([decode_image(data, embedder.image_size, name=name)  # [N, S, S, 3] uint8
                       for data, name in zip(images, names, strict=True)])
    return np.asarray(embedder.embed(pixels), dtype=np.float32)  # [N, D]


def _labels(records: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({str(m["label"]) for m in records if m.get("label") is not None})


def _say(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the two implementations


class _Gallery:
    """What both implementations share: ``search`` for one image or many."""

    description: str

    def _search(self, images: list[bytes], k: int, where: Where | None) -> list[list[Result]]:
        raise NotImplementedError

    @overload
    def search(self, images: bytes, k: int, where: Where | None = None) -> list[Result]: ...
    @overload
    def search(self, images: Sequence[bytes], k: int, where: Where | None = None) -> list[list[Result]]: ...
    def search(self, images: bytes | Sequence[bytes], k: int,
               where: Where | None = None) -> list[Result] | list[list[Result]]:
        """The ``k`` nearest gallery entries of ``images`` (one encoded image, or a list), best first,
        among those passing ``where`` (``ascl.serving.filters``)."""
        if isinstance(images, bytes | bytearray):
            return self._search([bytes(images)], k, where)[0]
        return self._search(list(images), k, where)


class InProcessGallery(_Gallery):
    """ONNX Runtime + FAISS in this process; picks up new index versions written by others."""

    def __init__(self, onnx_path: str | Path, index_dir: str | Path, *, threads: int = 0) -> None:
        from ascl.export.runtime import OnnxEmbedder

        self.embedder = OnnxEmbedder(onnx_path, threads=threads)
        self.index_dir = Path(index_dir)
        self.index = GalleryIndex.load(self.index_dir)
        if self.index.dim != self.embedder.embedding_dim:
            raise IndexFileError(
                f"{self.index_dir} holds {self.index.dim}-d vectors but {onnx_path} makes "
                f"{self.embedder.embedding_dim}-d embeddings; build the index with the same model"
            )
        from ascl.serving.model_identity import ensure_same_model, model_identity

        ensure_same_model(self.index.manifest.get("model"), model_identity(onnx_path, metadata=self.embedder.metadata),
                          f"index {self.index_dir}")
        self._lock = threading.Lock()
        self.description = f"in-process ONNX Runtime ({Path(onnx_path).name}) + FAISS ({self.index_dir})"

    def _current(self) -> GalleryIndex:
        """The index, reloaded when a newer version was written (a manifest read per call)."""
        with self._lock:
            if manifest_version(self.index_dir) != self.index.version:
                self.index = GalleryIndex.load(self.index_dir)
            return self.index

    def embed(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """Encoded images -> [N, D] unit embeddings (raises ImageError, naming the image, for bad input)."""
        return _embed_locally(self.embedder, list(images), names)

    def _search(self, images: list[bytes], k: int, where: Where | None) -> list[list[Result]]:
        index = self._current()
        index.field_index().matching(where)  # a bad filter fails before the images are embedded
        queries = self.embed(images)  # [Q, D]
        return [[Result.from_metadata(h.id, h.score, h.metadata) for h in hits]
                for hits in index.hits(queries, k, where)]  # k is clamped to the index size

    def labels(self) -> list[str]:
        return _labels(self._current().metadata.values())

    def add(self, image: bytes, *, name: str, label: str | None = None) -> Result:
        return add_images(self.index_dir, [(name, image)], self.embed, label=label).results[0]

    def remove(self, ids: Iterable[int]) -> int:
        return len(remove_images(self.index_dir, ids).results)

    def count(self) -> int:
        return int(self._current().ntotal)


class TritonGallery(_Gallery):
    """A running Triton server (``ascl serve`` / ``ascl up``) over gRPC.

    ``index_dir`` is the folder the server's search model reads; only ``add``, ``remove`` and
    ``count`` need it. Changes are written there and waited for until the server answers with them.
    """

    def __init__(self, url: str, index_dir: str | Path | None = None, *, add_timeout_s: float = 30.0) -> None:
        from ascl.serving.client import Client

        self.url = url
        self.client = Client(url)
        self.index_dir = Path(index_dir) if index_dir else None
        self.add_timeout_s = add_timeout_s
        self.description = f"Triton at {url}"

    def embed(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """[N, D] unit embeddings computed by the server (``names`` are not sent)."""
        return np.asarray(self.client.embed(list(images)), dtype=np.float32)

    def _search(self, images: list[bytes], k: int, where: Where | None) -> list[list[Result]]:
        return [[Result.from_metadata(h.id, h.score, h.metadata) for h in hits]
                for hits in self.client.search(images, k=k, where=where)]  # the server clamps k to the index size

    def labels(self) -> list[str]:
        """The labels in the served index folder (read here; empty without ``index_dir``)."""
        if self.index_dir is None:
            return []
        return _labels(GalleryIndex.load(self.index_dir).metadata.values())

    def _folder(self) -> Path:
        if self.index_dir is None:
            raise NoIndexFolderError("adding or removing images needs the served index folder; pass it "
                                     "(in the demo: start it with --index IDX)")
        return self.index_dir

    def add(self, image: bytes, *, name: str, label: str | None = None) -> Result:
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
        """Poll searches with ``probes`` until ``done(ids returned)`` holds (the server reloads new
        index versions by itself)."""
        deadline = time.monotonic() + self.add_timeout_s
        while True:
            found = {h.id for hits in self.client.search(probes, k=k) for h in hits}
            if done(found):
                return
            if time.monotonic() > deadline:
                raise AddNotServedError(
                    f"the server at {self.url} did not pick up the new index version within {self.add_timeout_s:.0f} s"
                )
            time.sleep(0.1)

    def count(self) -> int:
        if self.index_dir is None:
            return -1
        return int(read_manifest(self.index_dir).get("count", -1))


# ---------------------------------------------------------------------------- index folders, ports, the service


def model_onnx(ref: ModelRef, *, cache: str | Path | None = None, refresh: bool = False, precision: str = "fp32",
               calibration: str | Path | None = None, min_recall: float | None = None) -> tuple[Path, bool]:
    """(the ONNX file that serves ``ref``, whether it was exported just now): the content-keyed export cache.

    ``precision="int8"``: the calibrated int8 copy (``calibration``: an image-source spec), verified
    against fp32 and refused below ``min_recall`` (``ascl.serving.precision``)."""
    from ascl.export.cache import cached_onnx

    return cached_onnx(ref, cache=cache, refresh=refresh, precision=precision, calibration=calibration,
                       min_recall=min_recall)


def describe_precision(onnx_path: str | Path, made_now: bool = False, min_recall: float | None = None) -> str:
    """One line for the screen: the precision of ``onnx_path`` (int8: its calibration and recall@10 vs fp32)."""
    from ascl.export.cache import describe_int8
    from ascl.export.runtime import OnnxEmbedder

    path = Path(onnx_path)
    if OnnxEmbedder(path, providers=["CPUExecutionProvider"], threads=1).precision != "int8":
        return "fp32"
    return describe_int8(path, made_now, min_recall)


def build_index(onnx_path: str | Path, images: str | Path, index_dir: str | Path, *, factory: str = "auto") -> int:
    """Embed every image under ``images`` with ``onnx_path`` into the index at ``index_dir`` (a new one,
    or the new images added to an existing one). Unreadable images are skipped with a warning (a
    gallery folder is rarely perfectly clean). Returns the number of images in the index."""
    from ascl.serving import build

    return build.build_index(onnx_path, str(images), index_dir, factory=factory).total


def index_exists(index_dir: str | Path) -> bool:
    """True when ``index_dir`` holds an index (its manifest)."""
    return (Path(index_dir) / MANIFEST).is_file()


def index_manifest(index_dir: str | Path) -> dict[str, Any]:
    """The manifest of an index folder (IndexFileError, saying what to do, when it is not one)."""
    return read_manifest(index_dir)


def index_count(index_dir: str | Path) -> int:
    """How many images the index in ``index_dir`` holds (reads the manifest only)."""
    manifest = read_manifest(index_dir)
    return int(manifest["count"]) if "count" in manifest else GalleryIndex.load(index_dir).ntotal


def index_records(index_dir: str | Path) -> list[Result]:
    """Every entry of the index in ``index_dir``, by id (score 0)."""
    metadata = GalleryIndex.load(index_dir).metadata
    return [Result.from_metadata(i, 0.0, metadata[i]) for i in sorted(metadata)]


def source_folders(index_dir: str | Path) -> list[Path]:
    """The folders on this machine that the index's images live in."""
    sources = {str(m.get("source")) for m in GalleryIndex.load(index_dir).metadata.values()}
    return sorted(Path(s) for s in sources if Path(s).is_dir())


def check_ports_free(ports: dict[str, int], host: str = "127.0.0.1") -> None:
    """Fail fast, before any slow step, when a port is taken or two are the same.

    ``ports``: the command-line flag that sets each port (``--grpc-port``) -> port. Raises
    PortInUseError (a ServerError) naming the flag to change.
    """
    try:
        _check_server_ports(ports, host)
    except PortInUseError as exc:
        raise PortInUseError(f"port {exc.port} ({exc.name}) is in use; stop what uses it or pass {exc.name} N",
                             name=exc.name, host=exc.host, port=exc.port) from exc
    if len(set(ports.values())) != len(ports):
        *rest, last = ports
        raise PortInUseError(f"{', '.join(rest)} and {last} must all differ")


class RunningService(Protocol):
    """A started search service; ``stop`` returns once Triton and its stubs are gone."""

    def stop(self, grace_s: float = 30.0) -> None: ...


def start_service(onnx_path: str | Path, index_dir: str | Path, workdir: str | Path, *, grpc_port: int,
                  http_port: int, metrics_port: int, host: str = "127.0.0.1") -> RunningService:
    """Write the embedded model repository under ``workdir`` and start the search service on the ports.

    Returns once a search goes through. The service is ``ascl serve``'s: Triton behind the front
    door (inference, health and metadata only; bounded requests), restarted by its supervisor
    if it or a stub dies. The repository's search model reads ``index_dir`` in place, so images
    added to that index are served without a restart. Raises ServerError when it does not start.
    """
    from ascl.serving.model_identity import ensure_index_model
    from ascl.serving.repository import write_repository
    from ascl.serving.service import SearchService

    index_dir, workdir = Path(index_dir), Path(workdir)
    ensure_index_model(index_dir, onnx_path)
    repository = write_repository(workdir / index_dir.name, onnx_path, index_dir)
    service = SearchService(repository, host=host, grpc_port=grpc_port, http_port=http_port,
                            metrics_port=metrics_port, log_path=workdir / f"{index_dir.name}.log")
    return service.start()
