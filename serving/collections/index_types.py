"""What every index backend shares: the search hit, the errors, a new index's settings, the protocols.

Callers import these from ``ascl.serving.collections.index`` (the interface); a backend
(``faiss_index``: a versioned folder; ``milvus_index``: a Milvus collection) implements ``IndexBackend`` and ``VectorIndex`` with them.

Only numpy and ``ascl`` core at import: the Triton search model vendors this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ascl.errors import FAILURE, AsclError

# `auto` index types by collection size N, for every backend: exact search is cheap below FLAT_MAX; a
# graph index (HNSW) is fast and exact enough up to HNSW_MAX; beyond that an IVF index keeps memory and
# build time in check (an HNSW build at 1M x 512 on 2 cores takes too long).
FLAT_MAX = 50_000
HNSW_MAX = 300_000

IndexSpec = str | Path  # a folder (FAISS), or a URI such as milvus://HOST:PORT/COLLECTION


class IndexFileError(AsclError, ValueError):
    """A problem with an index that the user can fix; the message says how."""


class IndexBusyError(IndexFileError):
    """Another writer held the index for longer than this one would wait."""


class IndexUnavailableError(AsclError, ConnectionError):
    """The server that holds the index cannot be reached now (down, or a wrong address); the same
    request can succeed later. A search answers it as UNAVAILABLE; the command exits 1."""

    exit_code = FAILURE


class IndexConflictError(IndexFileError):
    """The index moved on to a newer version than the one this change started from."""


# Metadata fields that hold a place on the server (a folder, a list file, a file's path)
PATH_FIELDS = ("source", "path")


def public_metadata(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` as a client may see it: no path of the server's file system. ``source`` becomes
    the gallery's name (its folder's or list file's own name: ``/data/photos`` -> ``photos``), an
    absolute ``path`` its file name; relative paths (an image's place in its gallery) stay."""
    out = dict(record)
    for key in PATH_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and (value.startswith("/") or "\\" in value or value[1:3] == ":\\"):
            out[key] = value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return out


@dataclass(frozen=True)
class Hit:
    """One gallery entry as a search (or a listing) returns it: its id, its cosine similarity to
    the query (higher is closer; 0 in a listing) and its stored metadata."""

    id: int
    score: float
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str | None:
        label = self.metadata.get("label")
        return None if label is None else str(label)

    @property
    def name(self) -> str:
        """The image's path relative to its source, for a caption."""
        return str(self.metadata.get("path", self.id))

    @property
    def file(self) -> Path | None:
        """The image on this machine, when its source is a folder here."""
        source = self.metadata.get("source")
        return Path(source) / self.name if isinstance(source, str) and Path(source).is_dir() else None


@dataclass(frozen=True)
class NewIndex:
    """How to create an index that does not exist yet: the first writer's settings."""

    dim: int
    model: Mapping[str, Any]  # ascl.export.identity record of the embeddings
    factory: str = "auto"  # a backend's index type; auto: its choice for ``size_hint`` vectors
    size_hint: int = 0  # about how many vectors the first change adds


class VectorIndex(Protocol):
    """Unit-norm embeddings under int64 ids, with one metadata record each; inner-product search.

    What index building, dedup, the gallery service and the Triton search model use, whatever
    stores the vectors. Ids are never reused; one content key (``sha1`` of a record) keeps one id.
    """

    @property
    def dim(self) -> int: ...

    @property
    def version(self) -> int:
        """The version this object reads; each committed change makes a new one (0: never written)."""
        ...

    @property
    def model(self) -> dict[str, Any]:
        """The model identity record of its embeddings ({} when none was recorded)."""
        ...

    def info(self) -> dict[str, Any]:
        """What the index records about itself (version, dim, count, model, and the backend's own)."""
        ...

    def count(self) -> int:
        """How many vectors it holds."""
        ...

    def search(self, queries: np.ndarray, k: int, where: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> (scores [Q, k'] float32, ids [Q, k'] int64), best first, k' = min(k, matches).

        k <= 0 is a ValueError; ``where`` (``ascl.serving.collections.filters``) keeps only the
        entries that pass it, still k' results per row; an unknown field is a FilterError.
        """
        ...

    def hits(self, queries: np.ndarray, k: int, where: Any = None) -> list[list[Hit]]:
        """``search`` with the metadata attached: one ranked list per query."""
        ...

    def check_where(self, where: Any) -> None:
        """FilterError when ``where`` cannot be applied here (malformed, too large, an unknown field)."""
        ...

    def records(self, ids: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
        """id -> metadata, of every entry or of those of ``ids`` that it holds."""
        ...

    def known_keys(self) -> set[str]:
        """The content keys (``sha1`` of the image bytes) it holds."""
        ...

    def add(self, vectors: np.ndarray, records: list[dict[str, Any]]) -> np.ndarray:
        """Add unit vectors [N, D] with one record each; returns one id per record [N]. A record
        whose ``sha1`` is held already (or came earlier in ``records``) keeps that id, adding nothing."""
        ...

    def remove(self, ids: Iterable[int]) -> int:
        """Remove entries by id; returns how many were held."""
        ...

    def reconstruct(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [N, D] as stored, their ids [N]); IndexFileError when it keeps only lossy codes."""
        ...

    def refreshed(self) -> VectorIndex:
        """This object, or the newest committed version when another writer made one (cheap to ask)."""
        ...

    def warm(self) -> None:
        """Build what searches make on first use (filter lookups) now, off the request path."""
        ...


class IndexBackend(Protocol):
    """Where indexes of one kind live: ``open_index`` and its neighbours dispatch a spec to one."""

    def exists(self, spec: IndexSpec) -> bool: ...

    def read_info(self, spec: IndexSpec) -> dict[str, Any]:
        """``VectorIndex.info`` without opening the vectors (cheap); IndexFileError when there is none."""
        ...

    def open(self, spec: IndexSpec) -> VectorIndex: ...

    def writing(self, spec: IndexSpec, *, who: str, on_wait: Any, create: NewIndex | None,
                model: Mapping[str, Any] | None) -> AbstractContextManager[VectorIndex]: ...

    def copy(self, spec: IndexSpec, dest: Path) -> str:
        """Copy the current version into ``dest`` (a self-contained model repository); returns the
        spec that opens the copy, relative to ``dest``'s parent (or ``spec`` when nothing is copied)."""
        ...


def one_id_per_content(records: Sequence[Mapping[str, Any]], held: Mapping[str, int]
                       ) -> tuple[list[int], list[tuple[bool, int]]]:
    """The one-id-per-content rule of every backend's ``add``, as a plan.

    Returns (positions of the records to add, and per record: (True, its position among those
    added) or (False, the id it keeps)). A record whose ``sha1`` is in ``held`` (key -> id) keeps
    that id; one whose key came earlier in ``records`` shares that record's new id; a record
    without a key is always added.
    """
    pending: dict[str, int] = {}  # sha1 -> position among the records added now
    keep: list[int] = []
    slots: list[tuple[bool, int]] = []
    for j, record in enumerate(records):
        key = str(record["sha1"]) if "sha1" in record else None
        if key is not None and key in held:
            slots.append((False, held[key]))
        elif key is not None and key in pending:
            slots.append((True, pending[key]))
        else:
            if key is not None:
                pending[key] = len(keep)
            slots.append((True, len(keep)))
            keep.append(j)
    return keep, slots
