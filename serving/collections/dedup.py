"""Near-duplicate images: groups of images whose embeddings are within a cosine threshold.

``ascl dedup`` (``ascl.serving.collections.dedup_cli``) is a thin front end over this module:

- **Vectors.** From an image source (any spec of ``ascl.image_sources``) they are embedded here
  with the exported model (ONNX Runtime). From an index they are the index's own vectors, read
  back with ``VectorIndex.reconstruct`` (FAISS: ``reconstruct_n`` of the index inside the
  IDMap): exact for ``Flat`` and ``HNSW32`` (flat storage), the SQ8 re-ranking
  codes for ``auto``'s ``IVF...,PQ...x4fs,Refine(SQ8)`` (cosine to the original vector >= 0.987
  on the shipped default's CIFAR-10 embeddings, median 0.99998). An index that keeps only lossy
  codes (PQ without a flat / SQ refinement, which FAISS cannot even read back safely: its
  ``reconstruct_n`` of IVF fast-scan PQ crashes), or whose read-back vectors are far from unit
  norm (median error above ``LOSSY_NORM_ERROR``), is embedded again from the images its metadata
  names (source + path, checked against the stored sha1), with the index's model.
- **Pairs.** Embeddings are unit norm and the index is inner product, so cosine similarity is
  the inner product. Pairs at or above the threshold come from FAISS's exact range search for
  inner product (``faiss.range_search_inner_product``, the routine behind
  ``IndexFlatIP.range_search``), run for a chunk of query rows against the rows from the
  chunk's start on (the upper triangle: half the work of a full N x N search, and never an
  N x N matrix in memory). The chunk is 4,096 rows (FAISS's own query block, its fastest size
  here) and shrinks when a low threshold finds many pairs per row (``PAIR_BUDGET`` per chunk).
  Exact search over every pair costs N^2/2 dot products: 65-150 million pairs/s on this
  project's 2-core CPU at 128-d (``benchmarks/dedup.py``: 50k vectors in 8-19 s, by load),
  i.e. under a second for 10k images, 5-12 min for 300k, 1-2 h for 1M.
- **Groups** are anchored on their first member, not connected components: images are taken
  in order (the source's order; by id for an index); an image not in a group yet starts one,
  and every later image within the threshold of it that is not in a group yet joins it. So
  every member is within the threshold of its group's first member (the ``similarity`` column),
  and a chain A~B~C with A not ~ C never merges A and C. An image within the threshold of a
  member but not of the first member stays out of that group (it may start its own). Groups
  of one are not reported.

Output: one row per grouped image, ``group`` (1, 2, ... in the order of their first member),
``path``, ``similarity`` to the group's first member (1.0 for the first), plus ``id`` (index
mode) and ``label`` when known, as CSV or Parquet by the file's suffix.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ascl.atomic import atomic_path
from ascl.errors import AsclError
from ascl.image_sources import iter_images
from ascl.serving.collections.engine import embed_all
from ascl.serving.collections.index import IndexFileError, IndexSpec, VectorIndex, open_index, read_info

__all__ = [
    "DEFAULT_THRESHOLD", "DedupError", "DedupResult", "Embedded", "Group", "check_output", "dedup_images",
    "dedup_index", "drop_duplicates", "embed_images", "group_near_duplicates", "write_groups",
]

# Measured with benchmarks/dedup.py on the shipped default (benchmarks/README.md, "Near-duplicates"):
# 2,000 CIFAR-10 images + 700 planted copies; best F1 0.908 at 0.93, 0.905 at 0.94 with a third
# fewer false pairs (precision 0.967, recall 0.850). Taken from the shipped default's embedding
# space: another model has its own scale (rerun the benchmark with --model).
DEFAULT_THRESHOLD = 0.94
OUTPUT_SUFFIXES = (".csv", ".parquet")
QUERY_CHUNK = 4096  # query rows per range search (FAISS's own query block: its fastest size here)
MIN_CHUNK = 32
PAIR_BUDGET = 20_000_000  # pairs one range-search call may return (12 bytes each)
TOLERANCE = 1e-6  # float rounding of unit vectors: an exact copy may score 0.99999994
LOSSY_NORM_ERROR = 0.01  # median |norm - 1| of read-back vectors above which they are re-embedded


class DedupError(AsclError, ValueError):
    """Bad input for dedup (threshold, output file, source); the message says what to pass."""


@dataclass(frozen=True)
class Group:
    """One group: positions of its members (first member first) and their similarity to it."""

    members: list[int]
    similarity: list[float]  # 1.0 for the first member


@dataclass
class Embedded:
    """Vectors [N, D] (unit norm) with one record per row (path, label, source; id in index mode)."""

    vectors: np.ndarray
    records: list[dict[str, Any]]
    skipped: int = 0  # unreadable images left out


@dataclass
class DedupResult:
    """What a dedup found: the groups over ``records``, and the counts of the summary."""

    groups: list[Group]
    records: list[dict[str, Any]]
    threshold: float
    skipped: int = 0
    vectors_from: str = ""  # "embedded", "index", "re-embedded": where the vectors came from

    @property
    def images(self) -> int:
        return len(self.records)

    @property
    def grouped(self) -> int:
        return sum(len(g.members) for g in self.groups)

    @property
    def duplicates(self) -> int:
        """Images beyond the first of each group (what ``--drop`` removes)."""
        return self.grouped - len(self.groups)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per grouped image: group, path, similarity (+ id, label when known)."""
        with_id = any("id" in r for r in self.records)
        with_label = any(r.get("label") is not None for r in self.records)
        out = []
        for number, group in enumerate(self.groups, 1):
            for position, sim in zip(group.members, group.similarity, strict=True):
                record = self.records[position]
                row: dict[str, Any] = {"group": number, "path": str(record.get("path", "")), "similarity": sim}
                if with_id:
                    row["id"] = int(record["id"])
                if with_label:
                    row["label"] = None if record.get("label") is None else str(record["label"])
                out.append(row)
        return out

    def summary(self) -> str:
        skipped = f" ({self.skipped} unreadable left out)" if self.skipped else ""
        return (f"{self.images} images{skipped}: {len(self.groups)} groups of near-duplicates holding "
                f"{self.grouped} images ({self.duplicates} beyond the first of each) at threshold "
                f"{self.threshold:g} (cosine similarity to the group's first image)")


# ---------------------------------------------------------------------------- checks


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float in (0, 1], or DedupError saying what it means."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise DedupError(f"--threshold must be a number in (0, 1], got {threshold!r}") from None
    if not 0.0 < value <= 1.0:
        raise DedupError(f"--threshold must be in (0, 1] (cosine similarity; near-duplicates score about "
                         f"{DEFAULT_THRESHOLD} and up with the shipped default), got {value:g}")
    return value


def check_output(out: str | Path) -> Path:
    """``out`` when its suffix is .csv or .parquet (and pyarrow is there for Parquet); DedupError otherwise.

    Called before any embedding, so that a wrong name fails in a second, not after minutes.
    """
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise DedupError(f"{out}: the output must end in .csv or .parquet (the suffix picks the format)")
    if suffix == ".parquet":
        _pyarrow()
    if path.is_dir():
        raise DedupError(f"{out}: is a folder; --out names the file to write")
    return path


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DedupError("writing Parquet needs pyarrow: pip install pyarrow (or pip install 'ascl-hub[serve]'), "
                         "or write .csv instead") from None
    return pa


# ---------------------------------------------------------------------------- grouping


def _range_search(queries: np.ndarray, base: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FAISS's exact inner-product range search of ``queries`` [Q, D] in ``base`` [B, D].

    Returns (lims [Q+1], similarities [P], base rows [P]): query q's hits are
    ``lims[q]:lims[q+1]``, every inner product > ``radius``.
    """
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    base = np.ascontiguousarray(base, dtype=np.float32)
    result = faiss.RangeSearchResult(len(queries))
    faiss.range_search_inner_product(faiss.swig_ptr(queries), faiss.swig_ptr(base), queries.shape[1], len(queries),
                                     len(base), float(radius), result)
    lims = faiss.rev_swig_ptr(result.lims, len(queries) + 1).astype(np.int64)
    total = int(lims[-1])
    if total == 0:
        return lims, np.zeros(0, np.float32), np.zeros(0, np.int64)
    sims = faiss.rev_swig_ptr(result.distances, total).copy()
    rows = faiss.rev_swig_ptr(result.labels, total).astype(np.int64)
    return lims, sims, rows


def group_near_duplicates(vectors: np.ndarray, threshold: float, *, chunk: int = QUERY_CHUNK,
                          progress: Callable[[int, int], None] | None = None) -> list[Group]:
    """Groups of rows of ``vectors`` [N, D] (unit norm) within ``threshold`` of their first member.

    The anchored rule of the module doc, over FAISS range search in chunks of query rows (only
    pairs (i, j) with j >= the chunk's start are searched). Groups of one are left out; groups
    come in the order of their first member, members after it by similarity (highest first).
    ``progress(done, total)`` is called after each chunk.
    """
    threshold = check_threshold(threshold)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    group_of = np.full(n, -1, dtype=np.int64)  # -1: not in a group yet
    groups: list[Group] = []
    floor = threshold - TOLERANCE
    radius = float(np.nextafter(np.float32(floor), np.float32(-2)))  # FAISS keeps inner products > radius
    start, step = 0, min(chunk, MIN_CHUNK * 8)  # a small first chunk measures how many pairs a row has
    while start < n:
        stop = min(n, start + step)
        rows = start + np.flatnonzero(group_of[start:stop] < 0)  # rows taken by an earlier group search nothing
        if len(rows):
            lims, sims, hits = _range_search(vectors[rows], vectors[start:], radius)
            hits += start
            counts = np.diff(lims)
            for k in np.flatnonzero(counts > 1):  # a row whose only hit is itself stays alone
                i = int(rows[k])
                if group_of[i] >= 0:  # taken by a group started earlier in this chunk
                    continue
                nb, nb_sim = hits[lims[k]:lims[k + 1]], sims[lims[k]:lims[k + 1]]
                free = (group_of[nb] < 0) & (nb != i) & (nb_sim >= floor)
                if not free.any():
                    continue
                nb, nb_sim = nb[free], nb_sim[free]
                order = np.lexsort((nb, -nb_sim))
                group_of[i] = len(groups)
                group_of[nb] = len(groups)
                groups.append(Group([i, *nb[order].tolist()],
                                    [1.0, *np.minimum(nb_sim[order], 1.0).astype(float).tolist()]))
            per_row = max(1.0, float(lims[-1]) / len(rows))
            step = int(np.clip(PAIR_BUDGET / per_row, MIN_CHUNK, chunk))
        else:
            step = chunk
        start = stop
        if progress is not None:
            progress(start, n)
    return groups


# ---------------------------------------------------------------------------- vectors


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def embed_images(onnx_path: str | Path, images: Any, *, batch_size: int = 256, limit: int | None = None,
                 progress: bool = True) -> Embedded:
    """Embed every readable image of the source ``images`` (an ``ascl.image_sources`` spec), in its order.

    The embedding engine's one loop (``embed.embed_all``). Unreadable images are skipped with a
    warning (counted in ``skipped``). Identical files are all kept (an index build keeps one of
    them: that is the difference between the two modes).
    """
    done = embed_all(iter_images(images, limit), onnx_path, batch_size=batch_size, progress=progress,
                     desc=f"embedding {images}", total=limit, warn=lambda text: _say(text))
    records = [{"path": r["path"], "label": r["label"], "source": r["source"]} for r in done.records]
    return Embedded(done.vectors, records, done.bad)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def _reembed_index(onnx_path: str | Path, index: VectorIndex, ids: np.ndarray, *, batch_size: int,
                   progress: bool) -> np.ndarray:
    """The index's images embedded again from the sources their metadata names, in ``ids`` order.

    The engine's one loop, leaving out (before decoding) the files that changed since they were
    indexed (their sha1 differs) and, silently, those that no longer decode."""
    from ascl.export.runtime import onnx_facts

    dim = onnx_facts(onnx_path).embedding_dim
    if dim != index.dim:
        raise DedupError(f"the model makes {dim}-d embeddings but the index holds {index.dim}-d "
                         "vectors; pass the model the index was built with (--model)")
    position = {int(i): p for p, i in enumerate(ids.tolist())}
    held = index.records()
    wanted: dict[str, dict[str, int]] = {}  # source -> stored path -> id
    for i in ids.tolist():
        meta = held.get(int(i), {})
        wanted.setdefault(str(meta.get("source", "")), {})[str(meta.get("path", ""))] = int(i)
    vectors = np.zeros((len(ids), index.dim), np.float32)
    found = np.zeros(len(ids), dtype=bool)
    for source, paths in wanted.items():
        spec: Any = Path(source) if Path(source).is_dir() else source
        try:
            items = (item for item in iter_images(spec) if item.path in paths)
        except AsclError:
            continue  # a source that is gone: its images are reported missing below

        def changed(path: str, sha1: str, paths: dict[str, int] = paths) -> bool:
            stored = held[paths[path]].get("sha1")
            return bool(stored) and stored != sha1  # the file changed since it was indexed

        try:
            done = embed_all(items, onnx_path, batch_size=batch_size, skip=changed, progress=progress,
                             desc=f"re-embedding {source}", warn=lambda _text: None)
        except AsclError:
            continue
        rows = [position[paths[r["path"]]] for r in done.records]
        vectors[rows] = done.vectors
        found[rows] = True
    if not found.all():
        missing = [str(held.get(int(ids[p]), {}).get("path")) for p in np.flatnonzero(~found)[:3]]
        raise IndexFileError(
            f"{int((~found).sum())} of the index's {len(ids)} images are no longer at their source, or changed "
            f"(e.g. {', '.join(missing)}), so they cannot be embedded again; run 'ascl dedup IMAGES' on the images "
            "themselves instead")
    return vectors


# ---------------------------------------------------------------------------- the two modes


def _grouped(vectors: np.ndarray, threshold: float, progress: bool) -> list[Group]:
    """``group_near_duplicates`` with a progress bar on stderr (a million images take an hour or more)."""
    from tqdm import tqdm

    with tqdm(desc=f"pairs >= {threshold:g}", unit="img", total=len(vectors), disable=not progress,
              file=sys.stderr) as bar:

        def advance(done: int, total: int) -> None:
            bar.update(done - bar.n)

        return group_near_duplicates(vectors, threshold, progress=advance)


def dedup_images(onnx_path: str | Path, images: Any, threshold: float = DEFAULT_THRESHOLD, *,
                 batch_size: int = 256, limit: int | None = None, progress: bool = True) -> DedupResult:
    """Near-duplicate groups among the images of an image source, embedded with ``onnx_path``."""
    threshold = check_threshold(threshold)
    embedded = embed_images(onnx_path, images, batch_size=batch_size, limit=limit, progress=progress)
    groups = _grouped(embedded.vectors, threshold, progress)
    return DedupResult(groups, embedded.records, threshold, embedded.skipped, "embedded")


OnnxSpec = str | Path | Callable[[], Path] | None  # an ONNX file, or a function giving one when it is needed


def load_index_vectors(index: VectorIndex, onnx_path: OnnxSpec, *, batch_size: int = 256,
                       progress: bool = True) -> tuple[Embedded, str]:
    """The index's vectors and records in id order, and where the vectors came from.

    Read back from the index when it can give them exactly or nearly (Flat, HNSW, Refine(SQ8));
    else embedded again from the images with ``onnx_path`` (DedupError without one; a callable
    is called only then, so that a model is exported only when it is used).
    """
    try:
        vectors, ids = index.reconstruct()
        error = float(np.median(np.abs(np.linalg.norm(vectors, axis=1) - 1.0))) if len(vectors) else 0.0
        why = (f"its codes are lossy (median norm error {error:.3f})" if error > LOSSY_NORM_ERROR else "")
    except IndexFileError as exc:
        ids, why = np.array(sorted(index.records()), dtype=np.int64), exc.message
    origin = "index"
    if why:
        if onnx_path is None:
            raise DedupError(f"the index's vectors cannot be used ({why}) and there is no model to embed its images "
                             "again; pass --model")
        onnx = onnx_path() if callable(onnx_path) else onnx_path
        _say(f"note: {why}; embedding the index's images again with {Path(onnx).name}")
        vectors = _reembed_index(onnx, index, ids, batch_size=batch_size, progress=progress)
        origin = "re-embedded"
    order = np.argsort(ids, kind="stable")  # by id: the order the images were added in
    held = index.records()
    records = [{**held.get(int(i), {}), "id": int(i)} for i in ids[order].tolist()]
    return Embedded(_unit(vectors[order]), records), origin


def dedup_index(index_dir: IndexSpec, threshold: float = DEFAULT_THRESHOLD, *, onnx_path: OnnxSpec = None, batch_size: int = 256, progress: bool = True) -> DedupResult:
    """Near-duplicate groups among the vectors of the index in ``index_dir`` (ids in the records).

    ``onnx_path`` (the index's model) is used only when the index cannot give its vectors back.
    """
    threshold = check_threshold(threshold)
    index = open_index(index_dir)
    embedded, origin = load_index_vectors(index, onnx_path, batch_size=batch_size, progress=progress)
    groups = _grouped(embedded.vectors, threshold, progress)
    return DedupResult(groups, embedded.records, threshold, 0, origin)


# ---------------------------------------------------------------------------- output and --drop


def write_groups(result: DedupResult, out: str | Path) -> Path:
    """Write ``result.rows()`` to ``out`` (.csv or .parquet, atomically); returns the path."""
    path = check_output(out)
    rows = result.rows()
    columns = ["group", "path", "similarity"]
    if any("id" in r for r in result.records):
        columns.append("id")
    if any(r.get("label") is not None for r in result.records):
        columns.append("label")
    if path.suffix.lower() == ".csv":
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(["" if row[c] is None else (f"{row[c]:.6f}" if c == "similarity" else row[c])
                                 for c in columns])
        return path
    pa = _pyarrow()
    import pyarrow.parquet as pq

    types = {"group": pa.int64(), "path": pa.string(), "similarity": pa.float64(), "id": pa.int64(),
             "label": pa.string()}
    table = pa.table({c: pa.array([r[c] for r in rows], type=types[c]) for c in columns})
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return path


@dataclass(frozen=True)
class Dropped:
    """What ``drop_duplicates`` did: how many entries it removed, and the index afterwards."""

    removed: int
    version: int


def drop_duplicates(index_dir: IndexSpec, result: DedupResult, *,
                    on_wait: Callable[[str], None] | None = None) -> Dropped:
    """Remove every group member but the first from the index, in one new version.

    Through the gallery's one writer (``remove_images``: the writer lock, a new index version),
    and only while every group's first member is still indexed: when another writer removed
    one meanwhile, nothing is written (IndexConflictError: run dedup again). ``on_wait`` hears
    about a wait for another writer (default: a line on stderr).
    """
    from ascl.serving.collections.changes import remove_images

    keep = [int(result.records[g.members[0]]["id"]) for g in result.groups]
    drop = [int(result.records[p]["id"]) for g in result.groups for p in g.members[1:]]
    if not drop:
        return Dropped(0, int(read_info(index_dir)["version"]))
    done = remove_images(index_dir, drop, only_if_present=keep, who="ascl dedup --drop", on_wait=on_wait or _say)
    return Dropped(len(done.results), done.version)

