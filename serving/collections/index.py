"""The index interface: every index user goes through these few functions and ``VectorIndex``.

An index is named by a spec: a folder written by ``ascl index build`` (the FAISS backend,
``faiss_index``), or a URI whose scheme names another backend in ``BACKENDS``
(``milvus://HOST:PORT/COLLECTION`` and ``milvus+lite:///PATH.db#COLLECTION``: ``milvus_index``). ``open_index(spec)`` returns a ``VectorIndex`` to search and read;
``writing(spec, ...)`` is the one way to change one (a context: the changes of the block become
one new version, or none when it raises); ``index_exists`` and ``read_info`` answer cheaply
without opening the vectors. Index building, dedup, the gallery service and the Triton search
model use nothing else, so another backend fits in ``BACKENDS`` without touching them.

Only numpy and ``ascl`` core at import (faiss or pymilvus when an index is opened): the Triton
search model vendors this module and the backends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ascl.serving.collections import faiss_index, milvus_index
from ascl.serving.collections.index_types import (
    Hit,
    IndexBackend,
    IndexBusyError,
    IndexConflictError,
    IndexFileError,
    IndexSpec,
    IndexUnavailableError,
    NewIndex,
    VectorIndex,
    public_metadata,
)

__all__ = [
    "BACKENDS", "Hit", "IndexBusyError", "IndexConflictError", "IndexFileError", "IndexSpec", "IndexUnavailableError",
    "NewIndex", "VectorIndex", "as_spec", "backend_of", "copy_index", "ensure_index_model", "index_count",
    "index_exists", "limit_search_threads", "open_index", "public_metadata", "read_info", "recorded_onnx", "writing",
]

# URI scheme -> backend; a spec without a scheme is a folder (FAISS).
BACKENDS: dict[str, IndexBackend] = {scheme: milvus_index.BACKEND for scheme in milvus_index.SCHEMES}


def as_spec(spec: IndexSpec) -> IndexSpec:
    """``spec`` as the interface keeps it: a ``Path`` for a folder, the text of a URI as it is."""
    return str(spec) if "://" in str(spec) else Path(spec)


def backend_of(spec: IndexSpec) -> IndexBackend:
    """The backend that holds ``spec`` (IndexFileError for a URI scheme no backend serves)."""
    text = str(spec)
    scheme, sep, _ = text.partition("://")
    if not sep:
        return faiss_index.BACKEND
    backend = BACKENDS.get(scheme.lower())
    if backend is None:
        kinds = ", ".join(f"{s}://" for s in sorted(BACKENDS)) or "none in this version"
        raise IndexFileError(f"{text}: no index backend for {scheme}://; an index is a folder written by "
                             f"'ascl index build' (FAISS), or a URI of another backend ({kinds})")
    return backend


def open_index(spec: IndexSpec) -> VectorIndex:
    """The current version of the index ``spec``, to search and read (IndexFileError when there is none)."""
    return backend_of(spec).open(spec)


def limit_search_threads(threads: int) -> None:
    """At most ``threads`` threads per search in this process, for the backends that search here
    (FAISS's OpenMP pool); a server searching small batches beside its encoder wants 1."""
    faiss_index.limit_search_threads(threads)


def index_exists(spec: IndexSpec) -> bool:
    """True when ``spec`` names an index that holds a committed version."""
    return backend_of(spec).exists(spec)


def read_info(spec: IndexSpec) -> dict[str, Any]:
    """What the index records about itself (version, dim, count, model, ...), without opening the vectors."""
    return backend_of(spec).read_info(spec)


def index_count(spec: IndexSpec) -> int:
    """How many vectors the index holds (cheap when it records its count)."""
    info = read_info(spec)
    return int(info["count"]) if "count" in info else open_index(spec).count()


def writing(spec: IndexSpec, *, who: str, on_wait: Callable[[str], None] | None = None,
            create: NewIndex | None = None, model: Mapping[str, Any] | None = None
            ) -> AbstractContextManager[VectorIndex]:
    """Change the index ``spec``: ``with writing(spec, who=...) as index: index.add(...)``.

    One writer at a time (``who`` names this one to the others; ``on_wait`` hears once that it
    waits). What the block changes becomes one new version when it ends (``index.version``
    afterwards), nothing when it raises. ``create``: the settings for an index that does not
    exist yet (else IndexFileError). ``model``: the identity of the embeddings about to be
    written; ModelMismatchError, writing nothing, when the index holds another model's.
    """
    return backend_of(spec).writing(spec, who=who, on_wait=on_wait, create=create, model=model)


def copy_index(spec: IndexSpec, dest: Path) -> str:
    """Copy the current version into ``dest`` for a self-contained model repository; returns the
    spec the copy is opened with, relative to ``dest``'s parent (a URI index: ``spec`` itself)."""
    return backend_of(spec).copy(spec, dest)


def recorded_onnx(spec: IndexSpec) -> Path | None:
    """The ONNX file the index records it was built with, when that file is still on this machine."""
    onnx = read_info(spec).get("model", {}).get("onnx")
    return Path(onnx) if onnx and Path(onnx).is_file() else None


def ensure_index_model(spec: IndexSpec, onnx_path: str | Path) -> None:
    """ModelMismatchError (naming both) unless the index ``spec`` holds embeddings of the model of ``onnx_path``."""
    from ascl.export.identity import ensure_same_model, model_identity

    ensure_same_model(read_info(spec).get("model"), model_identity(onnx_path), f"index {spec}")
