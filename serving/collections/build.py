"""Embed a gallery with ONNX Runtime and write it into a versioned FAISS index folder.

Images already in the index (same content hash) are skipped, so re-running a build or an
``add`` over the same source only embeds what is new. ``build_index_from_parquet`` builds the
same index from a Parquet embedding set (``ascl embed``) without embedding again. Adding single
encoded images (an upload) is ``add_images`` (``ascl.serving.collections.changes``).
Every writer refuses embeddings of another model than the index's (``ascl.serving.collections.model_identity``).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ascl.image_sources import SourceImage, iter_images
from ascl.images import ImageError, decode_image
from ascl.serving.collections.index import (
    MANIFEST,
    GalleryIndex,
    auto_factory,
    read_manifest,
    writer_lock,
)
from ascl.serving.collections.model_identity import ensure_same_model, model_identity


@dataclass
class BuildReport:
    """What a build or add did: counts and the version written."""

    added: int
    skipped_known: int
    skipped_bad: int
    total: int
    version: int
    factory: str




def _batches(
    items: Iterator[SourceImage], known: set[str], size: int, image_size: int, counts: dict[str, int]
) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """Decoded uint8 batches [B, S, S, 3] with their metadata records, skipping known or bad images."""
    pixels: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    for item in items:
        data = item.read()
        sha1 = hashlib.sha1(data).hexdigest()
        if sha1 in known:
            counts["known"] += 1
            continue
        try:
            pixels.append(decode_image(data, image_size, name=item.path))
        except ImageError as exc:
            counts["bad"] += 1
            print(f"warning: skipping {exc}", file=sys.stderr)
            continue
        known.add(sha1)
        records.append({"path": item.path, "label": item.label, "size": len(data), "source": item.source,
                        "sha1": sha1})
        if len(pixels) == size:
            yield np.stack(pixels), records
            pixels, records = [], []
    if pixels:
        yield np.stack(pixels), records


def embed_source(
    onnx_path: Path, images: str, *, known: set[str], batch_size: int = 256, limit: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, int]]:
    """Embed the new images of ``images`` -> (vectors [N, D], records, skip counts)."""
    from tqdm import tqdm

    from ascl.export.runtime import OnnxEmbedder

    embedder = OnnxEmbedder(onnx_path)
    counts = {"known": 0, "bad": 0}
    vectors: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    with tqdm(desc=f"embedding {images}", unit="img", disable=not progress, total=limit) as bar:
        for pixels, recs in _batches(iter_images(images, limit), known, batch_size, embedder.image_size, counts):
            vectors.append(embedder.embed(pixels))  # [B, D]
            records.extend(recs)
            bar.update(len(recs))
    dim = embedder.embedding_dim
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), records, counts


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_existing(out: Path) -> GalleryIndex | None:
    """The index in ``out``, or None when ``out`` holds none yet."""
    return GalleryIndex.load(out) if (out / MANIFEST).is_file() else None


def check_same_model(index: GalleryIndex, model: dict[str, Any], out: Path) -> None:
    """ModelMismatchError (naming both) when ``index`` holds embeddings of another model than ``model``."""
    ensure_same_model(index.manifest.get("model"), model, f"index {out}")


def build_index(
    onnx_path: str | Path, images: str, out: str | Path, *, factory: str = "auto", batch_size: int = 256,
    limit: int | None = None, progress: bool = True,
) -> BuildReport:
    """Create ``out`` from ``images``, or add the new images of ``images`` to an existing ``out``.

    The embedding runs without the writer lock (it can take minutes); the change is then
    applied under the lock to the index as it is at that moment, skipping images another
    writer added meanwhile, so concurrent writers never undo each other.
    """
    onnx_path, out = Path(onnx_path), Path(out)
    model = model_identity(onnx_path)  # name, weights, dim, precision, and the ONNX file with its sha1
    snapshot = load_existing(out)
    if snapshot is not None:
        check_same_model(snapshot, model, out)
    known = snapshot.known_keys() if snapshot else set()
    vectors, records, counts = embed_source(onnx_path, images, known=known, batch_size=batch_size, limit=limit,
                                            progress=progress)
    return _apply(out, vectors, records, counts, factory=factory, model=model, what=images)


def build_index_from_parquet(
    embeddings: str | Path, out: str | Path, *, factory: str = "auto", model: dict[str, Any] | None = None,
) -> BuildReport:
    """Create ``out`` from a Parquet embedding set (``ascl embed``), or add its new rows to ``out``.

    Nothing is embedded again: vectors and metadata (path, label, size, sha1, and the set's
    source) come from the set's finished parts; the index manifest records the set's model.
    Refuses (ModelMismatchError) a set or an index of another model than ``model`` (when given)
    or than each other. Rows whose sha1 is indexed already are skipped, as in ``build_index``.
    """
    from ascl.serving.collections.parquet_set import embeddings_of, iter_parts
    from ascl.serving.collections.parquet_set import read_manifest as read_set_manifest

    embeddings, out = Path(embeddings), Path(out)
    manifest = read_set_manifest(embeddings)
    set_model = dict(manifest["model"])
    if model is not None:
        ensure_same_model(set_model, model, f"embedding set {embeddings}")
    snapshot = load_existing(out)
    if snapshot is not None:
        check_same_model(snapshot, set_model, out)
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


def _apply(out: Path, vectors: np.ndarray, records: list[dict[str, Any]], counts: dict[str, int], *, factory: str,
           model: dict[str, Any], what: str) -> BuildReport:
    """Write ``vectors`` with ``records`` into the index at ``out`` (a new one, or a new version) under the lock."""
    created = not out.exists()
    try:
        with writer_lock(out, who="ascl index build/add", on_wait=_say):
            index = load_existing(out)
            if index is None:
                if len(vectors) == 0:
                    raise ImageError(f"{what}: no readable images to index")
                chosen = auto_factory(len(vectors), vectors.shape[1]) if factory == "auto" else factory
                index = GalleryIndex.create(vectors.shape[1], chosen, model=model)
            else:
                check_same_model(index, model, out)
            before = index.ntotal
            index.add_new(vectors, records)  # skips what another writer added meanwhile
            added = index.ntotal - before
            counts["known"] += len(records) - added
            version = index.save(out) if added or index.version == 0 else index.version
    except BaseException:
        if created:  # leave no half-made folder behind
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    return BuildReport(added, counts["known"], counts["bad"], index.ntotal, version,
                       str(index.manifest["factory"]))


def remove_from_index(out: str | Path, ids: list[int], paths: list[str]) -> tuple[int, int]:
    """Remove entries by id or by stored path; returns (removed, new version)."""
    from ascl.serving.collections.changes import remove_images

    done = remove_images(out, ids, paths=paths, who="ascl index remove", on_wait=_say)
    return len(done.results), done.version


def index_info(out: str | Path) -> dict[str, Any]:
    """Summary of an index folder: manifest fields plus counts per label."""
    manifest = read_manifest(out)
    index = GalleryIndex.load(out)
    labels: dict[str, int] = {}
    for record in index.metadata.values():
        key = str(record.get("label"))
        labels[key] = labels.get(key, 0) + 1
    return {**manifest, "ntotal": index.ntotal, "labels": dict(sorted(labels.items()))}
