"""A Parquet embedding set on disk: part files, ``errors.parquet`` and ``_manifest.json``.

Layout of a set folder (``ascl embed ... --out DIR``)::

    _manifest.json          the model, the source, the schema, the finished parts (written last)
    part-000000.parquet     rows of ids [0, R), R = --max-rows-per-file positions of the source
    part-000001.parquet     rows of ids [R, 2R) ...
    errors.parquet          the images that could not be read or decoded: id, path, error

One row per image: ``id`` (int64, its position in the source order, stable), ``path`` (its key in
the source: relative path, listed line, archive member), ``label`` (string, null when the layout
gives none), ``sha1`` (of the encoded bytes), ``size`` (encoded bytes), ``width`` and ``height``
(of the original image), ``embedding`` (fixed-size list of float32 [D], unit norm).

Commits, in this order, each one atomic (``ascl.atomic``): the part file, then errors.parquet,
then the manifest that lists the part. A reader trusts only the parts the manifest lists and the
errors whose ids they cover, so a run killed at any moment leaves a set that reads as "the
parts finished so far", and a re-run redoes only the part that was in progress (its file is
written again under the same name). One writer at a time (an advisory lock on ``.writer.lock``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ascl.atomic import LOCK_FILE, atomic_path, atomic_write_text, folder_lock
from ascl.errors import AsclError

if TYPE_CHECKING:
    import pyarrow as pa

MANIFEST_NAME = "_manifest.json"
ERRORS_NAME = "errors.parquet"
LOCK_NAME = LOCK_FILE  # the one folder writer lock (ascl.atomic.folder_lock)
PART_PREFIX = "part-"
FORMAT = "ascl-embedding-set"
FORMAT_VERSION = 1
DEFAULT_ROWS_PER_FILE = 100_000
COLUMNS = ("id", "path", "label", "sha1", "size", "width", "height", "embedding")


class EmbeddingSetError(AsclError, ValueError):
    """A folder that is not a usable embedding set, or a run that does not fit the set it would extend."""


class EmbeddingSetBusyError(EmbeddingSetError):
    """Another ``ascl embed`` is writing the same set."""


def require_pyarrow() -> Any:
    """``pyarrow``, or an error saying what to install."""
    try:
        import pyarrow
    except ImportError as exc:
        raise EmbeddingSetError("Parquet embedding sets need pyarrow: pip install 'ascl-hub[serve]' "
                                "(or pip install pyarrow)") from exc
    return pyarrow


def part_name(index: int) -> str:
    """The file name of part ``index``: zero-padded, so that name order is id order."""
    return f"{PART_PREFIX}{index:06d}.parquet"


def schema(dim: int) -> pa.Schema:
    """The Arrow schema of every part file of a set of ``dim``-d embeddings."""
    pa = require_pyarrow()
    return pa.schema([
        pa.field("id", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("sha1", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
    ])


def errors_schema() -> pa.Schema:
    pa = require_pyarrow()
    return pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("path", pa.string(), nullable=False),
                      pa.field("error", pa.string(), nullable=False)])


def schema_record(dim: int) -> dict[str, str]:
    """The schema as the manifest records it: column -> Arrow type."""
    return {f.name: str(f.type) for f in schema(dim)}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- reading


def is_embedding_set(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a set folder (EmbeddingSetError, saying what to do, when it is not one)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise EmbeddingSetError(f"{folder}: not an embedding set (no {MANIFEST_NAME}); "
                                "write one with 'ascl embed IMAGES --out DIR'")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EmbeddingSetError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise EmbeddingSetError(f"{path}: not an {FORMAT} v{FORMAT_VERSION} manifest "
                                f"(format {manifest.get('format')!r} v{manifest.get('format_version')!r})")
    return manifest


def iter_parts(folder: str | Path, manifest: dict[str, Any] | None = None) -> Iterator[pa.Table]:
    """The finished parts of a set, in id order, one Arrow table each."""
    pq = _parquet()
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    for part in manifest["parts"]:
        path = folder / part["file"]
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise EmbeddingSetError(f"{path}: unreadable part file ({exc})") from exc
        if table.num_rows != part["rows"]:
            raise EmbeddingSetError(f"{path}: {table.num_rows} rows, the manifest says {part['rows']}; "
                                    "the set was changed by hand: embed it again into a new --out")
        yield table


def read_table(folder: str | Path) -> pa.Table:
    """Every finished row of a set as one Arrow table (small sets; large ones: ``iter_parts``)."""
    pa = require_pyarrow()
    manifest = read_manifest(folder)
    tables = list(iter_parts(folder, manifest))
    return pa.concat_tables(tables) if tables else schema(int(manifest["model"]["dim"])).empty_table()


def embeddings_of(table: pa.Table) -> np.ndarray:
    """float32 [N, D] from a table's ``embedding`` column."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return np.asarray(column.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def read_errors(folder: str | Path, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The errors of the finished parts: [{"id", "path", "error"}, ...] in id order."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    return _errors_below(folder, int(manifest.get("next_id", 0)))


def _errors_below(folder: Path, end_id: int) -> list[dict[str, Any]]:
    path = folder / ERRORS_NAME
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = _parquet().read_table(path).to_pylist()
    return [r for r in rows if int(r["id"]) < end_id]


def _parquet() -> Any:
    require_pyarrow()
    import pyarrow.parquet as pq

    return pq


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold the set's writer lock, or raise EmbeddingSetBusyError at once (no waiting: a second
    ``ascl embed`` on the same folder is a mistake, not a turn to take)."""

    def busy(holder: str) -> Exception:
        return EmbeddingSetBusyError(f"{folder}: {holder} is writing this embedding set; wait for it to "
                                     "finish (or stop it), then run this again to resume")

    with folder_lock(folder, busy=busy, timeout_s=0.0, who="ascl embed"):
        yield


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files a killed writer left behind (atomic writes that never completed)."""
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


@dataclass
class ResultBatch:
    """What an engine hands the writer: consecutive source positions, each one a row or an error.

    ``ids`` [N] int64 of the rows, with their columns and ``embeddings`` [N, D]; ``errors``
    (id, path, message) for the positions that gave no row; together they cover ids
    ``[start, end)`` exactly, but for ``skipped`` positions that a skip rule left out (never
    in a set: ``ascl embed`` skips nothing).
    """

    start: int
    end: int
    ids: np.ndarray
    paths: list[str]
    labels: list[str | None]
    sha1: list[str]
    sizes: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    embeddings: np.ndarray
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    skipped: int = 0


@dataclass
class _Pending:
    first_id: int
    batches: list[ResultBatch] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    last_path: str | None = None


class SetWriter:
    """Appends consecutive positions to a set, committing a part every ``rows_per_file`` positions.

    Holds the manifest in memory; ``add`` takes ``ResultBatch``es in id order (split across part
    boundaries here), ``finish`` commits the last, shorter part and marks the source done.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], rows_per_file: int, *, precision: str = "fp32") -> None:
        if rows_per_file < 1:
            raise EmbeddingSetError(f"--max-rows-per-file must be >= 1, got {rows_per_file}")
        self.folder = folder
        self.precision = precision
        self.manifest = manifest
        self.rows_per_file = rows_per_file
        self.next_id = int(manifest["next_id"])
        self.dim = int(manifest["model"]["dim"])
        self.errors = _errors_below(folder, self.next_id)  # of the finished parts only
        self.pending = _Pending(self.next_id)
        self.committed_now = 0

    @property
    def part_end(self) -> int:
        return self.pending.first_id + self.rows_per_file

    def add(self, batch: ResultBatch) -> None:
        if batch.start != self.next_id:
            raise RuntimeError(f"results out of order: expected id {self.next_id}, got {batch.start}")
        while batch.end > self.part_end:  # split at the part boundary
            head, batch = split_batch(batch, self.part_end)
            self._take(head)
            self.commit()
        self._take(batch)
        if self.next_id == self.part_end:
            self.commit()

    def _take(self, batch: ResultBatch) -> None:
        if batch.end == batch.start:
            return
        self.pending.batches.append(batch)
        self.pending.errors.extend(batch.errors)
        last = (batch.paths[-1], int(batch.ids[-1])) if len(batch.ids) else None
        last_error = (batch.errors[-1][1], batch.errors[-1][0]) if batch.errors else None
        candidates = [c for c in (last, last_error) if c is not None]
        self.pending.last_path = max(candidates, key=lambda c: c[1])[0] if candidates else self.pending.last_path
        self.next_id = batch.end

    def commit(self) -> None:
        """Write the pending positions as one part (if any), then errors, then the manifest."""
        pending = self.pending
        if self.next_id == pending.first_id:
            return
        pa = require_pyarrow()
        pq = _parquet()
        index = len(self.manifest["parts"])
        name = part_name(index)
        table = self._table(pending.batches)
        with atomic_path(self.folder / name) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        if pending.errors or any(int(e["id"]) >= pending.first_id for e in self.errors):
            self.errors = [e for e in self.errors if int(e["id"]) < pending.first_id]
            self.errors += [{"id": i, "path": p, "error": m} for i, p, m in pending.errors]
            errors = pa.Table.from_pylist(self.errors, schema=errors_schema())
            with atomic_path(self.folder / ERRORS_NAME) as tmp:
                pq.write_table(errors, tmp)
        self.manifest["parts"].append({
            "file": name, "first_id": pending.first_id, "end_id": self.next_id, "rows": table.num_rows,
            "errors": len(pending.errors), "bytes": (self.folder / name).stat().st_size,
            "last_path": pending.last_path, "precision": self.precision,
        })
        self.manifest["next_id"] = self.next_id
        self.manifest["count"] = int(self.manifest["count"]) + table.num_rows
        self.manifest["errors"] = len(self.errors)
        self.save_manifest()
        self.committed_now += 1
        self.pending = _Pending(self.next_id)

    def finish(self, *, exhausted: bool) -> None:
        """Commit what is pending; ``exhausted``: the source (or its --limit) has no more images."""
        self.commit()
        if exhausted != bool(self.manifest.get("complete")) or self.committed_now:
            self.manifest["complete"] = exhausted
            self.save_manifest()

    def save_manifest(self) -> None:
        self.manifest["updated"] = now()
        atomic_write_text(self.folder / MANIFEST_NAME, json.dumps(self.manifest, indent=2) + "\n")

    def _table(self, batches: Sequence[ResultBatch]) -> pa.Table:
        pa = require_pyarrow()
        flat = np.concatenate([b.embeddings.reshape(-1) for b in batches]).astype(np.float32, copy=False)
        columns = {
            "id": pa.array(np.concatenate([b.ids for b in batches]).astype(np.int64), pa.int64()),
            "path": pa.array([p for b in batches for p in b.paths], pa.string()),
            "label": pa.array([lab for b in batches for lab in b.labels], pa.string()),
            "sha1": pa.array([s for b in batches for s in b.sha1], pa.string()),
            "size": pa.array(np.concatenate([b.sizes for b in batches]).astype(np.int64), pa.int64()),
            "width": pa.array(np.concatenate([b.widths for b in batches]).astype(np.int32), pa.int32()),
            "height": pa.array(np.concatenate([b.heights for b in batches]).astype(np.int32), pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), self.dim),
        }
        return pa.Table.from_pydict(columns, schema=schema(self.dim))


def split_batch(batch: ResultBatch, at: int) -> tuple[ResultBatch, ResultBatch]:
    """(positions below ``at``, positions from ``at``) of one batch."""
    n = int(np.searchsorted(batch.ids, at))

    def part(sl: slice, start: int, end: int, errors: list[tuple[int, str, str]]) -> ResultBatch:
        return ResultBatch(start, end, batch.ids[sl], batch.paths[sl], batch.labels[sl], batch.sha1[sl],
                           batch.sizes[sl], batch.widths[sl], batch.heights[sl], batch.embeddings[sl], errors)

    head = part(slice(0, n), batch.start, at, [e for e in batch.errors if e[0] < at])
    tail = part(slice(n, None), at, batch.end, [e for e in batch.errors if e[0] >= at])
    return head, tail


def new_manifest(model: dict[str, Any], source: dict[str, Any], rows_per_file: int) -> dict[str, Any]:
    """The manifest of an empty set."""
    created = now()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": model, "dim": model["dim"],
        "source": source, "schema": schema_record(int(model["dim"])), "max_rows_per_file": rows_per_file,
        "count": 0, "errors": 0, "next_id": 0, "complete": False, "parts": [], "created": created,
        "updated": created,
    }
