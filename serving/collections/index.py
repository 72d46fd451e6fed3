"""A FAISS gallery index with external int64 ids and a metadata sidecar, versioned on disk.

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
for the read-modify-write of one change (``ascl index build/add/remove`` and the demo's add all
use it), and ``GalleryIndex.save`` refuses to write over a version it did not start from, so
two writers can never lose each other's changes.

This module imports only numpy, faiss, ``ascl`` core modules and ``ascl.serving.collections.filters``
(filtered search): the Triton search model vendors them into the model repository.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ascl.atomic import atomic_path, atomic_write_text, folder_lock
from ascl.errors import AsclError
from ascl.serving.collections.filters import FieldIndex, Where

MANIFEST = "manifest.json"
FORMAT = 1
# `auto` factory thresholds (collection size N): exact search is cheap below FLAT_MAX; a graph
# index is fast and exact enough up to HNSW_MAX; beyond that IVF + fast-scan PQ with a
# re-ranking step keeps memory and build time in check (HNSW build at 1M x 512 on 2 cores
# takes too long).
FLAT_MAX = 50_000
HNSW_MAX = 300_000
HNSW_EF_SEARCH = 128
IVF_NPROBE = 64
REFINE_K_FACTOR = 32  # PQ shortlists k * 32 candidates, re-ranked with SQ8 codes (cheap, near exact)


class IndexFileError(AsclError, ValueError):
    """A problem with an index folder that the user can fix; the message says how."""


class IndexBusyError(IndexFileError):
    """Another writer held the index for longer than this one would wait."""


class IndexConflictError(IndexFileError):
    """The folder moved on to a newer version than the one this change started from."""


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


@dataclass(frozen=True)
class Hit:
    """One search result: the gallery id, the cosine similarity, and the stored metadata."""

    id: int
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


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


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an index folder, with a clear error when it is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IndexFileError(f"{folder}: not an index folder (no {MANIFEST}); create one with 'ascl index build'")
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
    """Unit-norm embeddings under external int64 ids, with one metadata dict per id."""

    def __init__(self, index: Any, metadata: dict[int, dict[str, Any]], manifest: dict[str, Any]) -> None:
        self.index = index
        self.metadata = metadata
        self.manifest = manifest
        self._fields: FieldIndex | None = None  # the filter lookup of these entries (built on first use)

    @classmethod
    def create(cls, dim: int, factory: str, *, model: dict[str, Any] | None = None) -> GalleryIndex:
        """An empty index. ``factory`` is a FAISS factory string without the IDMap prefix."""
        import faiss

        try:
            index = faiss.index_factory(int(dim), f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise IndexFileError(f"bad FAISS factory {factory!r}: {str(exc).splitlines()[-1]}") from exc
        manifest = {"format": FORMAT, "version": 0, "dim": int(dim), "factory": factory,
                    "next_id": 0, "model": model or {}}
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
            raise IndexFileError(f"{index_file}: unreadable FAISS index ({str(exc).splitlines()[-1]})") from exc
        apply_search_params(index)
        metadata: dict[int, dict[str, Any]] = {}
        with open(folder / manifest["metadata"], encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    record = json.loads(line)
                    metadata[int(record["id"])] = record
        return cls(index, metadata, manifest)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def field_index(self) -> FieldIndex:
        """Metadata field -> value -> entries, for filtered search: built once per version of the entries."""
        fields = self._fields
        if fields is None:
            fields = self._fields = FieldIndex(self.index, self.metadata)
        return fields

    def known_keys(self) -> set[str]:
        """Content keys (sha1 of the image bytes) already indexed: re-runs skip these."""
        return {str(m["sha1"]) for m in self.metadata.values() if "sha1" in m}

    def train_if_needed(self, vectors: np.ndarray, seed: int = 0) -> None:
        """Train IVF/PQ parts on a random sample of ``vectors`` [N, D] (no-op for Flat/HNSW)."""
        if self.index.is_trained:
            return
        n = training_size(str(self.manifest["factory"]), len(vectors)) or len(vectors)
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(len(vectors), size=min(n, len(vectors)), replace=False))]
        self.index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, vectors: np.ndarray, records: Sequence[dict[str, Any]]) -> np.ndarray:
        """Add unit vectors [N, D] with one metadata dict each; returns the new ids [N]."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise IndexFileError(f"expected vectors of shape [N, {self.dim}], got {list(vectors.shape)}")
        if len(records) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(records)} metadata records")
        start = int(self.manifest["next_id"])
        ids = np.arange(start, start + len(vectors), dtype=np.int64)  # [N]
        if len(vectors) == 0:
            return ids
        self.train_if_needed(vectors)
        self.index.add_with_ids(vectors, ids)
        self._fields = None
        for i, record in zip(ids.tolist(), records, strict=True):
            self.metadata[i] = {"id": i, **record}
        self.manifest["next_id"] = start + len(vectors)
        return ids

    def add_new(self, vectors: np.ndarray, records: Sequence[dict[str, Any]]) -> list[int]:
        """Add the records whose content key (``sha1``) is not indexed yet; returns one id per record.

        The one dedupe rule of every writer (``ascl index build/add``, the gallery service's add):
        a record whose ``sha1`` is indexed already, or appears earlier in ``records``, keeps that
        entry's id and adds nothing. vectors: [N, D] unit embeddings, one per record.
        """
        by_key = {str(m["sha1"]): i for i, m in self.metadata.items() if "sha1" in m}
        pending: dict[str, int] = {}  # sha1 -> position among the records added now
        keep: list[int] = []
        slots: list[tuple[bool, int]] = []  # per record: (added now?, position among the new ones or id)
        for j, record in enumerate(records):
            key = str(record["sha1"]) if "sha1" in record else None
            if key is not None and key in by_key:
                slots.append((False, by_key[key]))
                continue
            if key is None or key not in pending:
                if key is not None:
                    pending[key] = len(keep)
                slots.append((True, len(keep)))
                keep.append(j)
            else:
                slots.append((True, pending[key]))
        new_ids = self.add(np.asarray(vectors)[keep], [records[j] for j in keep]).tolist()
        return [new_ids[value] if is_new else value for is_new, value in slots]

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

    def search(self, queries: np.ndarray, k: int, where: Where | str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> (scores [Q, k'] float32, ids [Q, k'] int64), best first, k' = min(k, N).

        A k larger than the index is clamped (an index can shrink while clients keep asking for
        their usual k); k <= 0 raises ValueError, so that a server fails that one request.
        ``where`` (``{"label": "cat"}``, ``ascl.serving.collections.filters``) keeps only the entries that pass
        it, inside FAISS: k' = min(k, matching entries), none matching gives [Q, 0]; an unknown
        field raises FilterError (a ValueError) naming the known ones.
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
        return version


def _remove_old_versions(folder: Path, oldest_kept: int) -> None:
    for path in folder.glob("*.v*.*"):
        stem = path.name.split(".v", 1)[1].split(".", 1)[0]
        if stem.isdigit() and int(stem) < oldest_kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
