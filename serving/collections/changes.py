"""Changes to a gallery index: encoded images added (uploads), entries removed, one version each.

Adding images is written once, in ``add_images``: the content hash (sha1) dedupes (the same
bytes keep one id), the file is saved under the index's ``added/`` folder, and the change is one
new index version written under the index's writer lock, taking turns with ``ascl index
build/add/remove``. A served search model reloads new versions by itself. ``remove_images`` is
the one removal (``ascl index remove``, ``ascl dedup --drop``, the gallery services).
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ascl.atomic import atomic_write_bytes
from ascl.errors import AsclError
from ascl.images import ImageError
from ascl.serving.collections.index import (
    Hit,
    IndexConflictError,
    IndexSpec,
    open_index,
    writing,
)

__all__ = [
    "ADDED_FOLDER", "MAX_LABEL_CHARS", "Added", "Embed", "LabelError", "Removed", "add_image_bytes",
    "add_images", "clean_label", "embed_encoded", "remove_images",
]

ADDED_FOLDER = "added"  # inside the index folder: the images added through the service
MAX_LABEL_CHARS = 64
Embed = Callable[[list[bytes], list[str]], np.ndarray]  # (images, their names) -> [N, D] unit embeddings


class LabelError(AsclError, ValueError):
    """A label that cannot be stored (too long, not printable)."""


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


@dataclass(frozen=True)
class Added:
    """What ``add_images`` did: one record and one "added now?" flag per item, and the index after."""

    results: list[Hit]
    new: list[bool]  # False: these bytes were indexed already (or came earlier in the same call)
    total: int  # vectors in the index afterwards
    version: int  # the index version afterwards


def files_folder(index: IndexSpec, files: str | Path | None = None) -> Path:
    """Where the images added to ``index`` are kept: ``files``, else the index folder's ``added/``; for
    an index on a server (a URI), ``<cache>/added/<the URI as a name>`` on this machine."""
    if files is not None:
        return Path(files)
    if "://" in str(index):
        from ascl.cache import cache_dir

        return cache_dir() / ADDED_FOLDER / re.sub(r"[^A-Za-z0-9._-]+", "_", str(index))
    return Path(index) / ADDED_FOLDER


def add_images(index_dir: IndexSpec, items: Sequence[tuple[str, bytes]], embed: Embed, *,
               label: str | None = None, who: str = "a gallery add",
               on_wait: Callable[[str], None] | None = None, files: str | Path | None = None) -> Added:
    """Add encoded images (name, bytes) to the index ``index_dir``: the one way to add an upload.

    Images whose bytes are indexed already keep their id and are not embedded again; the others
    are embedded with ``embed`` (outside the lock: it can be a round trip to a server), saved as
    ``<files>/<sha1[:16]><suffix>`` (``files_folder``) and added in one new index version under
    the writer lock, skipping any that another writer added meanwhile. Nothing is written when
    ``embed`` raises (ImageError for bytes that are no image).
    """
    label = clean_label(label)
    keys = [hashlib.sha1(data).hexdigest() for _, data in items]
    known = open_index(index_dir).known_keys()
    todo: dict[str, int] = {}  # sha1 -> first item with these bytes, among those not indexed yet
    for j, key in enumerate(keys):
        if key not in known and key not in todo:
            todo[key] = j
    vectors = embed([items[j][1] for j in todo.values()], [items[j][0] for j in todo.values()]) if todo else None
    added_dir = files_folder(index_dir, files)
    with writing(index_dir, who=who, on_wait=on_wait) as index:
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
            index.add(np.asarray(vectors)[[position[key] for key, _ in fresh]], records)
        held = index.records()
    by_key = {str(m["sha1"]): i for i, m in held.items() if "sha1" in m}
    fresh_keys = {key for key, _ in fresh}
    results = [Hit(by_key[key], 1.0, held[by_key[key]]) for key in keys]
    new = [key in fresh_keys and todo[key] == j for j, key in enumerate(keys)]
    return Added(results, new, index.count(), index.version)


def add_image_bytes(out: str | Path, onnx_path: str | Path, items: list[tuple[str, bytes]], *,
                    label: str | None = None) -> list[int]:
    """Add encoded images (name, bytes) to the index in ``out`` with the ONNX model; returns their ids.

    ``add_images`` with an ONNX Runtime embedder: an image already indexed (same bytes) keeps
    its id; a served index picks the new version up within a second.
    """
    from ascl.export.runtime import OnnxEmbedder

    embedder = OnnxEmbedder(onnx_path)
    return [r.id for r in add_images(out, items, lambda images, names: embed_encoded(embedder, images, names),
                                     label=label, who="add_image_bytes", on_wait=_say).results]


@dataclass(frozen=True)
class Removed:
    """What ``remove_images`` did: the records it removed and the index version afterwards."""

    results: list[Hit]
    version: int


def remove_images(index_dir: IndexSpec, ids: Iterable[int], *, paths: Iterable[str] = (),
                  who: str = "a gallery remove", on_wait: Callable[[str], None] | None = None,
                  only_if_present: Iterable[int] = ()) -> Removed:
    """Remove entries by id or by stored path in one new index version, under the writer lock
    (``ascl index remove``, ``ascl dedup --drop`` and the gallery services). Nothing is written
    when none is there, nor (IndexConflictError) when an id of ``only_if_present`` (what the caller
    keeps in their place, e.g. a duplicate's original) is no longer indexed."""
    paths = set(paths)
    with writing(index_dir, who=who, on_wait=on_wait) as index:
        held = index.records()
        gone_meanwhile = sorted({int(i) for i in only_if_present} - set(held))
        if gone_meanwhile:
            raise IndexConflictError(f"{index_dir}: id {gone_meanwhile[0]}, which this removal keeps, was removed "
                                     "meanwhile by another writer; nothing was written: run it again")
        wanted = {int(i) for i in ids} | {i for i, m in held.items() if m.get("path") in paths}
        gone = [Hit(i, 0.0, held[i]) for i in sorted(wanted) if i in held]
        index.remove(r.id for r in gone)
    return Removed(gone, index.version)


def embed_encoded(embedder: Any, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
    """Encoded images -> [N, D] unit embeddings with an OnnxEmbedder, through the engine's one loop
    (in this thread: one small batch); ImageError names the first image that is no image."""
    from ascl.image_sources import SourceImage
    from ascl.serving.collections.engine import run_local

    names = list(names) if names is not None else [f"image {i}" if len(images) > 1 else "image"
                                                    for i in range(len(images))]
    if not images:
        return np.zeros((0, embedder.embedding_dim), np.float32)
    items = [(i, SourceImage(name, None, "", _reader(data), name=name))
             for i, (data, name) in enumerate(zip(images, names, strict=True))]
    (batch,) = run_local(items, embedder, batch_size=len(items), decode_workers=0)
    if batch.errors:
        raise ImageError(batch.errors[0][2])
    return np.asarray(batch.embeddings, dtype=np.float32)  # [N, D]


def _reader(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
