"""Embed a gallery with ONNX Runtime and write it into an index (``ascl.serving.collections.index``).

Images already in the index (same content hash) are skipped, so re-running a build or an
``add`` over the same source only embeds what is new. ``build_index_from_parquet`` builds the
same index from a Parquet embedding set (``ascl embed``) without embedding again. Adding single
encoded images (an upload) is ``add_images`` (``ascl.serving.collections.changes``).
Every writer refuses embeddings of another model than the index's (``ascl.export.identity``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ascl.export.identity import ensure_same_model, model_identity
from ascl.image_sources import iter_images
from ascl.images import ImageError
from ascl.serving.collections.engine import embed_all
from ascl.serving.collections.index import (
    IndexSpec,
    NewIndex,
    VectorIndex,
    index_exists,
    open_index,
    read_info,
    writing,
)


@dataclass
class BuildReport:
    """What a build or add did: counts and the version written."""

    added: int
    skipped_known: int
    skipped_bad: int
    total: int
    version: int
    factory: str




def embed_source(
    onnx_path: Path, images: str, *, known: set[str], batch_size: int = 256, limit: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, int]]:
    """Embed the images of ``images`` not in ``known`` (content keys) -> (vectors [N, D], records, skip counts).

    The engine's one loop (``embed.embed_all``), with the images the index holds already left
    out before they are decoded; unreadable ones are skipped with a warning.
    """
    done = embed_all(iter_images(images, limit), onnx_path, batch_size=batch_size,
                     skip=lambda _path, sha1: sha1 in known, progress=progress, desc=f"embedding {images}",
                     total=limit, warn=_say)
    return done.vectors, done.records, {"known": done.skipped, "bad": done.bad}


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_existing(out: IndexSpec, model: dict[str, Any]) -> VectorIndex | None:
    """The index ``out`` (checked to hold embeddings of ``model``: ModelMismatchError), or None when
    there is none yet."""
    if not index_exists(out):
        return None
    index = open_index(out)
    ensure_same_model(index.model, model, f"index {out}")
    return index


def build_index(
    onnx_path: str | Path, images: str, out: IndexSpec, *, factory: str = "auto", batch_size: int = 256,
    limit: int | None = None, progress: bool = True,
) -> BuildReport:
    """Create ``out`` from ``images``, or add the new images of ``images`` to an existing ``out``.

    The embedding runs without the writer lock (it can take minutes); the change is then
    applied under the lock to the index as it is at that moment, skipping images another
    writer added meanwhile, so concurrent writers never undo each other.
    """
    onnx_path = Path(onnx_path)
    model = model_identity(onnx_path)  # name, weights, dim, precision, and the ONNX file with its sha1
    snapshot = load_existing(out, model)
    known = snapshot.known_keys() if snapshot else set()
    vectors, records, counts = embed_source(onnx_path, images, known=known, batch_size=batch_size, limit=limit,
                                            progress=progress)
    return _apply(out, vectors, records, counts, factory=factory, model=model, what=images)


def build_index_from_parquet(
    embeddings: str | Path, out: IndexSpec, *, factory: str = "auto", model: dict[str, Any] | None = None,
) -> BuildReport:
    """Create ``out`` from a Parquet embedding set (``ascl embed``), or add its new rows to ``out``.

    Nothing is embedded again: vectors and metadata (path, label, size, sha1, and the set's
    source) come from the set's finished parts; the index manifest records the set's model.
    Refuses (ModelMismatchError) a set or an index of another model than ``model`` (when given)
    or than each other. Rows whose sha1 is indexed already are skipped, as in ``build_index``.
    """
    from ascl.serving.collections.parquet_set import embeddings_of, iter_parts
    from ascl.serving.collections.parquet_set import read_manifest as read_set_manifest

    embeddings = Path(embeddings)
    manifest = read_set_manifest(embeddings)
    set_model = dict(manifest["model"])
    if model is not None:
        ensure_same_model(set_model, model, f"embedding set {embeddings}")
    snapshot = load_existing(out, set_model)
    known = snapshot.known_keys() if snapshot else set()
    source = str(manifest["source"]["source"])
    counts = {"known": 0, "bad": int(manifest.get("errors", 0))}
    vectors: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    for table in iter_parts(embeddings, manifest):
        columns = table.select(["path", "label", "size", "sha1"]).to_pydict()
        keep = []
        for j, sha1 in enumerate(columns["sha1"]):
            if sha1 in known:
                counts["known"] += 1
                continue
            known.add(sha1)
            keep.append(j)
            records.append({"path": columns["path"][j], "label": columns["label"][j], "size": int(columns["size"][j]),
                            "source": source, "sha1": sha1})
        vectors.append(embeddings_of(table)[keep])
    dim = int(manifest["model"]["dim"])
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return _apply(out, stacked, records, counts, factory=factory, model=set_model, what=str(embeddings))


def _apply(out: IndexSpec, vectors: np.ndarray, records: list[dict[str, Any]], counts: dict[str, int], *,
           factory: str, model: dict[str, Any], what: str) -> BuildReport:
    """Write ``vectors`` with ``records`` into the index ``out`` (a new one, or a new version), one writer at a time."""
    new = NewIndex(int(vectors.shape[1]), model, factory, size_hint=len(vectors))
    with writing(out, who="ascl index build/add", on_wait=_say, create=new, model=model) as index:
        if index.version == 0 and len(vectors) == 0:  # a new index needs at least one image
            raise ImageError(f"{what}: no readable images to index")
        before = index.count()
        index.add(vectors, records)  # skips what another writer added meanwhile
        added = index.count() - before
        counts["known"] += len(records) - added
    return BuildReport(added, counts["known"], counts["bad"], index.count(), index.version,
                       str(index.info().get("factory", "")))


def remove_from_index(out: IndexSpec, ids: list[int], paths: list[str]) -> tuple[int, int]:
    """Remove entries by id or by stored path; returns (removed, new version)."""
    from ascl.serving.collections.changes import remove_images

    done = remove_images(out, ids, paths=paths, who="ascl index remove", on_wait=_say)
    return len(done.results), done.version


def index_info(out: IndexSpec) -> dict[str, Any]:
    """Summary of an index: what it records about itself plus counts per label."""
    info = read_info(out)
    index = open_index(out)
    labels: dict[str, int] = {}
    for record in index.records().values():
        key = str(record.get("label"))
        labels[key] = labels.get(key, 0) + 1
    return {**info, "ntotal": index.count(), "labels": dict(sorted(labels.items()))}
