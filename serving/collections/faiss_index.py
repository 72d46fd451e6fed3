"""The FAISS index backend: external int64 ids and a metadata sidecar, versioned in a folder.

``GalleryIndex`` is one loaded version (a ``VectorIndex`` of ``ascl.serving.collections.index``);
``BACKEND`` opens, reads and writes folders for that interface.

Layout of an index folder (everything written atomically, the manifest last):

    manifest.json          {"format": 1, "version": V, "index": "index.vV.faiss",
                            "metadata": "metadata.vV.jsonl", "dim": D, "factory": ..., ...}
    index.vV.faiss         faiss.write_index of an IndexIDMap2 (inner product on unit vectors)
    metadata.vV.jsonl      one JSON object per vector: {"id", "path", "label", "size", "source", "sha1"}

A writer saves new versioned files, then replaces ``manifest.json``; readers open the files
the manifest names. A server therefore detects a new version by a changed manifest version and
never sees a half-written index. The previous version's files are kept so that a reader that
read the old manifest an instant before can still open them.

Writers take turns: ``writer_lock`` holds an advisory lock on ``.writer.lock`` in the folder
for the read-modify-write of one change (``BACKEND.writing``, which every writer goes through),
and ``GalleryIndex.save`` refuses to write over a version it did not start from, so two writers
can never lose each other's changes.

This module imports only numpy, faiss, ``ascl`` core modules and the index interface's types and
filters: the Triton search model vendors them into the model repository.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ascl.atomic import atomic_path, atomic_write_text, folder_lock
from ascl.serving.collections.faiss_filters import FieldIndex
from ascl.serving.collections.filters import Where, check_fields, parse_where
from ascl.serving.collections.index_types import (
    FLAT_MAX,
    HNSW_MAX,
    Hit,
    IndexBusyError,
    IndexConflictError,
    IndexFileError,
    IndexSpec,
    NewIndex,
    one_id_per_content,
)

MANIFEST = "manifest.json"
FORMAT = 1
# `auto` factory thresholds: FLAT_MAX and HNSW_MAX (index_types, shared by every backend); beyond
# HNSW_MAX, IVF + fast-scan PQ with a re-ranking step keeps memory and build time in check.
HNSW_EF_SEARCH = 128
IVF_NPROBE = 64
REFINE_K_FACTOR = 32  # PQ shortlists k * 32 candidates, re-ranked with SQ8 codes (cheap, near exact)
RECONSTRUCT_CHUNK = 65536


@contextlib.contextmanager
def writer_lock(folder: str | Path, *, timeout_s: float = 300.0, who: str = "",
                on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the index folder's writer lock for one change (``ascl.atomic.folder_lock``).

    Waits up to ``timeout_s`` for another writer (saying so once through ``on_wait``), then
    raises IndexBusyError naming the holder. The lock goes with the process: a writer killed
    mid-change leaves no stale lock behind.
    """

    def busy(holder: str) -> Exception:
        return IndexBusyError(f"{folder}: {holder} has been writing this index for over {timeout_s:.0f} s; "
                              "wait for it to finish (or stop it) and run this again")

    with folder_lock(folder, busy=busy, timeout_s=timeout_s, who=who, on_wait=on_wait):
        yield


def auto_factory(n: int, dim: int) -> str:
    """The FAISS factory string `auto` picks for ``n`` vectors of dimension ``dim``."""
    if n < FLAT_MAX:
        return "Flat"
    if n < HNSW_MAX:
        return "HNSW32"
    nlist = int(min(65536, max(1024, np.sqrt(n) // 256 * 256)))  # ~sqrt(N) lists, trained on 64 per list
    m = dim // 2 if dim % 2 == 0 else dim
    return f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)"


def training_size(factory: str, n: int) -> int:
    """How many vectors to train an IVF factory on (a sample keeps k-means fast)."""
    if not factory.startswith("IVF"):
        return 0
    nlist = int(factory[3:].split(",")[0].split("_")[0])
    return min(n, 64 * nlist)


def apply_search_params(index: Any) -> None:
    """Set the query-time knobs (HNSW efSearch, IVF nprobe) used by every reader."""
    import faiss

    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    base = faiss.downcast_index(inner.base_index) if isinstance(inner, faiss.IndexRefine) else inner
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = HNSW_EF_SEARCH
    ivf = faiss.try_extract_index_ivf(base)
    if ivf is not None:
        ivf.nprobe = min(IVF_NPROBE, ivf.nlist)
    if isinstance(inner, faiss.IndexRefine):
        inner.k_factor = float(REFINE_K_FACTOR)


def limit_search_threads(threads: int) -> None:
    """FAISS's OpenMP threads in this process (its idle threads spin-wait, stealing CPU)."""
    import faiss

    faiss.omp_set_num_threads(max(1, int(threads)))


def not_an_index(folder: str | Path) -> IndexFileError:
    return IndexFileError(f"{folder}: not an index folder (no {MANIFEST}); create one with 'ascl index build'")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an index folder, with a clear error when it is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise not_an_index(folder)
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexFileError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise IndexFileError(f"{path}: unknown index format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def manifest_version(folder: str | Path) -> int:
    """The version number of the index in ``folder`` (cheap: reads the manifest only)."""
    return int(read_manifest(folder)["version"])


class GalleryIndex:
    """One version of a FAISS index: unit-norm embeddings under external int64 ids, one metadata
    dict per id (a ``VectorIndex``). ``folder``: where it was loaded from or saved to (None: in memory)."""

    def __init__(self, index: Any, metadata: dict[int, dict[str, Any]], manifest: dict[str, Any],
                 folder: Path | None = None) -> None:
        self.index = index
        self.metadata = metadata
        self.manifest = manifest
        self.folder = folder
        self.changed = False  # entries added or removed since it was loaded or saved
        self._fields: FieldIndex | None = None  # the filter lookup of these entries (built on first use)

    @classmethod
    def create(cls, dim: int, factory: str, *, model: Mapping[str, Any] | None = None) -> GalleryIndex:
        """An empty index. ``factory`` is a FAISS factory string without the IDMap prefix."""
        import faiss

        try:
            index = faiss.index_factory(int(dim), f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise IndexFileError(f"bad FAISS factory {factory!r}: {str(exc).splitlines()[-1]}") from exc
        manifest = {"format": FORMAT, "version": 0, "dim": int(dim), "factory": factory,
                    "next_id": 0, "model": dict(model or {})}
        return cls(index, {}, manifest)

    @classmethod
    def load(cls, folder: str | Path) -> GalleryIndex:
        """Open the current version of ``folder`` (the files are only read)."""
        import faiss

        folder = Path(folder)
        manifest = read_manifest(folder)
        index_file = folder / manifest["index"]
        try:
            index = faiss.read_index(str(index_file))
        except RuntimeError as exc:
            detail = str(exc).splitlines()[-1].rsplit("failed: ", 1)[-1]  # past FAISS's C++ function signature
            raise IndexFileError(f"{index_file}: unreadable FAISS index, truncated or damaged ({detail}); "
                                 "rebuild it with 'ascl index build'") from exc
        apply_search_params(index)
        metadata: dict[int, dict[str, Any]] = {}
        metadata_file = folder / manifest["metadata"]
        number = 0
        try:
            with open(metadata_file, encoding="utf-8") as fh:
                for line in fh:
                    number += 1
                    if line.strip():
                        record = json.loads(line)
                        metadata[int(record["id"])] = record
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise IndexFileError(f"{metadata_file}: damaged metadata at line {number} ({type(exc).__name__}: "
                                 f"{str(exc)[:200]}); rebuild the index with 'ascl index build'") from exc
        return cls(index, metadata, manifest, folder)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.manifest.get("model") or {})

    def info(self) -> dict[str, Any]:
        return {**self.manifest, "count": self.ntotal}

    def count(self) -> int:
        return self.ntotal

    def field_index(self) -> FieldIndex:
        """Metadata field -> value -> entries, for filtered search: built once per version of the entries."""
        fields = self._fields
        if fields is None:
            fields = self._fields = FieldIndex(self.index, self.metadata)
        return fields

    def check_where(self, where: Where | str | bytes | None) -> None:
        parsed = parse_where(where)
        if parsed:
            check_fields(parsed, self.field_index().fields)

    def warm(self) -> None:
        fields = self.field_index()
        if "label" in fields.fields:
            fields.field("label")

    def records(self, ids: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
        if ids is None:
            return dict(self.metadata)
        return {int(i): self.metadata[int(i)] for i in ids if int(i) in self.metadata}

    def known_keys(self) -> set[str]:
        """Content keys (sha1 of the image bytes) already indexed: re-runs skip these."""
        return {str(m["sha1"]) for m in self.metadata.values() if "sha1" in m}

    def refreshed(self) -> GalleryIndex:
        """Itself, or the folder's newer version when another writer saved one (reads the manifest)."""
        if self.folder is None or manifest_version(self.folder) == self.version:
            return self
        return GalleryIndex.load(self.folder)

    def train_if_needed(self, vectors: np.ndarray, seed: int = 0) -> None:
        """Train IVF/PQ parts on a random sample of ``vectors`` [N, D] (no-op for Flat/HNSW)."""
        if self.index.is_trained:
            return
        n = training_size(str(self.manifest["factory"]), len(vectors)) or len(vectors)
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(len(vectors), size=min(n, len(vectors)), replace=False))]
        self.index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, vectors: np.ndarray, records: Sequence[dict[str, Any]]) -> np.ndarray:
        """Add unit vectors [N, D] with one metadata dict each; returns one id per record [N].

        The one dedupe rule of every writer (``index_types.one_id_per_content``): a record whose
        ``sha1`` is indexed already, or appears earlier in ``records``, keeps that entry's id and
        adds nothing. New ids continue from the highest ever given (never reused).
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise IndexFileError(f"expected vectors of shape [N, {self.dim}], got {list(vectors.shape)}")
        if len(records) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(records)} metadata records")
        held = {str(m["sha1"]): i for i, m in self.metadata.items() if "sha1" in m}
        keep, slots = one_id_per_content(records, held)
        start = int(self.manifest["next_id"])
        new_ids = np.arange(start, start + len(keep), dtype=np.int64)  # [K]
        if len(keep):
            fresh = np.ascontiguousarray(vectors[keep])
            self.train_if_needed(fresh)
            self.index.add_with_ids(fresh, new_ids)
            self._fields = None
            self.changed = True
            for i, j in zip(new_ids.tolist(), keep, strict=True):
                self.metadata[i] = {"id": i, **records[j]}
            self.manifest["next_id"] = start + len(keep)
        return np.array([new_ids[value] if is_new else value for is_new, value in slots], dtype=np.int64)

    def remove(self, ids: Iterable[int]) -> int:
        """Remove ``ids``; returns how many were present. HNSW cannot delete, so it is rebuilt."""
        import faiss

        wanted = np.asarray(sorted({int(i) for i in ids} & set(self.metadata)), dtype=np.int64)
        if len(wanted) == 0:
            return 0
        try:
            removed = int(self.index.remove_ids(faiss.IDSelectorArray(wanted)))
        except RuntimeError:  # e.g. HNSW: rebuild from the stored vectors
            removed = self._rebuild_without(set(wanted.tolist()))
        for i in wanted.tolist():
            self.metadata.pop(i, None)
        self._fields = None
        self.changed = True
        return removed

    def _rebuild_without(self, drop: set[int]) -> int:
        import faiss

        id_map = faiss.vector_to_array(self.index.id_map)  # [N] internal -> external
        keep = np.array([j for j, i in enumerate(id_map.tolist()) if i not in drop], dtype=np.int64)
        vectors = self.index.index.reconstruct_n(0, self.index.ntotal)[keep]  # [K, D]
        fresh = GalleryIndex.create(self.dim, str(self.manifest["factory"]))
        if len(keep):
            fresh.train_if_needed(vectors)
            fresh.index.add_with_ids(vectors, id_map[keep])
        removed = int(self.index.ntotal - fresh.index.ntotal)
        self.index = fresh.index
        return removed

    def reconstruct(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [N, D] as the index stores them, their ids [N]), in the IDMap's order.

        Exact for ``Flat`` and ``HNSW32`` (flat storage), the SQ8 re-ranking codes for ``auto``'s
        ``IVF...,PQ...x4fs,Refine(SQ8)``. Raises IndexFileError when the index type keeps only
        lossy codes (PQ without a flat / SQ refinement).
        """
        import faiss

        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)  # [N] position -> id
        n = self.ntotal
        vectors = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return vectors, ids
        inner = faiss.downcast_index(self.index.index)
        source = _stored_vectors(inner)
        if source is None:
            raise IndexFileError(f"this index ({self.manifest.get('factory')}, {type(inner).__name__}) does not "
                                 "keep its vectors, only lossy codes")
        try:
            for start in range(0, n, RECONSTRUCT_CHUNK):
                count = min(RECONSTRUCT_CHUNK, n - start)
                vectors[start:start + count] = source.reconstruct_n(start, count)
        except RuntimeError as exc:
            raise IndexFileError(f"this index ({self.manifest.get('factory')}) cannot give its vectors back "
                                 f"({str(exc).splitlines()[-1][:120]})") from exc
        return vectors, ids

    def search(self, queries: np.ndarray, k: int, where: Where | str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> (scores [Q, k'] float32, ids [Q, k'] int64), best first, k' = min(k, N).

        A k larger than the index is clamped (an index can shrink while clients keep asking for
        their usual k); k <= 0 raises ValueError, so that a server fails that one request.
        ``where`` (``{"label": "cat"}``, ``ascl.serving.collections.filters``) keeps only the entries
        that pass it, inside FAISS (``faiss_filters``): k' = min(k, matching entries), none matching
        gives [Q, 0]; an unknown field raises FilterError (a ValueError) naming the known ones.
        """
        if k <= 0:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected embeddings of shape [N, {self.dim}], got {list(queries.shape)}")
        k = min(k, self.ntotal)
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if where:
            return self.field_index().search(self.index, queries, k, where)
        scores, ids = self.index.search(queries, k)
        return scores.astype(np.float32), ids.astype(np.int64)

    def hits(self, queries: np.ndarray, k: int, where: Where | str | None = None) -> list[list[Hit]]:
        """Like ``search`` but with metadata attached: one ranked list per query."""
        scores, ids = self.search(queries, k, where)
        return [
            [Hit(int(i), float(s), self.metadata.get(int(i), {})) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]

    def save(self, folder: str | Path, *, keep_previous: int = 1) -> int:
        """Write the next version into ``folder`` (files first, manifest last); returns it.

        Raises IndexConflictError, writing nothing, when ``folder`` is no longer at the version
        this index was loaded from (hold ``writer_lock`` across load and save to take turns).
        """
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        current = manifest_version(folder) if (folder / MANIFEST).is_file() else 0
        if current != self.version:
            raise IndexConflictError(
                f"{folder} is at version {current}, but this change started from version {self.version}: another "
                "writer changed the index meanwhile, and writing now would undo that. Nothing was written; run it again"
            )
        version = current + 1
        index_name, meta_name = f"index.v{version}.faiss", f"metadata.v{version}.jsonl"
        with atomic_path(folder / index_name) as tmp:
            faiss.write_index(self.index, str(tmp))
        lines = (json.dumps(self.metadata[i], sort_keys=True) + "\n" for i in sorted(self.metadata))
        with atomic_path(folder / meta_name) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
        self.manifest.update(version=version, index=index_name, metadata=meta_name, count=self.ntotal)
        atomic_write_text(folder / MANIFEST, json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
        _remove_old_versions(folder, version - keep_previous)
        self.folder, self.changed = folder, False
        return version


def _remove_old_versions(folder: Path, oldest_kept: int) -> None:
    for path in folder.glob("*.v*.*"):
        stem = path.name.split(".v", 1)[1].split(".", 1)[0]
        if stem.isdigit() and int(stem) < oldest_kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _stored_vectors(inner: Any) -> Any:
    """The FAISS index to read ``inner``'s vectors from with ``reconstruct_n``, or None.

    Only storage that keeps every vector whole or as scalar-quantised codes (flat, SQ, the
    flat / SQ8 refinement of ``auto``'s IVF-PQ, HNSW or IVF over flat / SQ storage): PQ codes
    are too lossy to tell near-duplicates apart, and FAISS 1.15's ``reconstruct_n`` of an
    IVF fast-scan PQ index crashes the process.
    """
    import faiss

    whole = (faiss.IndexFlat, faiss.IndexScalarQuantizer)
    if isinstance(inner, faiss.IndexRefine):
        refine = faiss.downcast_index(inner.refine_index)
        return refine if isinstance(refine, whole) else None
    if isinstance(inner, faiss.IndexHNSW):
        return inner if isinstance(faiss.downcast_index(inner.storage), whole) else None
    if isinstance(inner, (*whole, faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer)):
        return inner
    return None


class FaissFolders:
    """The FAISS backend of ``ascl.serving.collections.index``: an index is a folder (``BACKEND``)."""

    def exists(self, spec: IndexSpec) -> bool:
        return (Path(spec) / MANIFEST).is_file()

    def read_info(self, spec: IndexSpec) -> dict[str, Any]:
        return read_manifest(spec)

    def open(self, spec: IndexSpec) -> GalleryIndex:
        return GalleryIndex.load(spec)

    @contextlib.contextmanager
    def writing(self, spec: IndexSpec, *, who: str, on_wait: Callable[[str], None] | None = None,
                create: NewIndex | None = None, model: Mapping[str, Any] | None = None) -> Iterator[GalleryIndex]:
        """The folder's current version under its writer lock, saved as the next version when the
        block changed it (or created it). An error in the block writes nothing, and removes a folder
        this call created. ModelMismatchError when ``model`` is not the index's."""
        from ascl.export.identity import ensure_same_model

        folder = Path(spec)
        created = not folder.exists()
        try:
            with writer_lock(folder, who=who, on_wait=on_wait):
                if self.exists(folder):
                    index = GalleryIndex.load(folder)
                elif create is not None:
                    factory = auto_factory(create.size_hint, create.dim) if create.factory == "auto" else create.factory
                    index = GalleryIndex.create(create.dim, factory, model=create.model)
                    index.folder = folder
                else:
                    raise not_an_index(folder)
                if model is not None:
                    ensure_same_model(index.model, dict(model), f"index {spec}")
                yield index
                if index.changed or index.version == 0:
                    index.save(folder)
        except BaseException:
            if created:  # leave no half-made folder behind
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def copy(self, spec: IndexSpec, dest: Path) -> str:
        """The current version's files (index, metadata, manifest) copied into ``dest``."""
        folder = Path(spec)
        manifest = read_manifest(folder)
        dest.mkdir(parents=True)
        for name in (manifest["index"], manifest["metadata"], MANIFEST):
            shutil.copy2(folder / name, dest / name)
        return dest.name


BACKEND = FaissFolders()
