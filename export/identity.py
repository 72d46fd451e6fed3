"""Which model an ONNX file or a set of embeddings came from, and the checks that they never mix.

Two questions, one error (``ModelMismatchError``, exit 2) and one comparison of recorded facts
(``differences``):

- Was this ONNX file exported from this encoder? ``ascl.export.pipeline.check_exported_from``
  compares the file's structure metadata (``ascl.names.STRUCTURE_KEYS``) with the encoder's
  (``ascl export verify``, the export pipeline); the weights are then judged by the parity numbers.
- Were these embeddings made by this model? ``ensure_same_model`` (below).

Every index manifest (``ascl index build/add``) and every Parquet embedding set (``ascl embed``)
records ``model_identity(onnx)``: the model's name, the kind of spec it came from, its weights
(``weights``: the identity), embedding dim, precision, image size, and the ONNX file it was run
from. ``ensure_same_model(recorded, model, where)`` is the one check, used wherever embeddings
of one model meet another: adding to an index or a set, building an index from a set, serving
or searching an index.

Identity = ``weights`` + ``dim``. ``weights`` comes from the ONNX's ``ascl.source_revision``
metadata, which every export writes from ``ascl.models.ModelRef.source_revision``: a hash of
the weight bytes (``sha256:<content key>``) or a hub revision (then ``<model name>@<revision>``).
An fp16 or int8 export of the same weights carries the same source revision, so it is the same
model. A graph with no known source revision is identified by its own bytes (``onnx-sha1:...``).
Older index manifests record only the ONNX file and its sha1: the file's identity is read when it
is still there, else the sha1 is compared.

Only the standard library, ``ascl`` core and the one metadata reader (``ascl.export.runtime``)
at import; ONNX (or ONNX Runtime) loads to read a file's metadata.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ascl.digest import file_digest
from ascl.errors import AsclError
from ascl.export.runtime import onnx_metadata
from ascl.names import (
    EMBEDDING_DIM_KEY,
    IMAGE_SIZE_KEY,
    MODEL_NAME_KEY,
    PRECISION_KEY,
    SOURCE_REVISION_KEY,
)

__all__ = ["ModelMismatchError", "describe_model", "differences", "ensure_same_model", "model_identity", "same_model"]

UNKNOWN_REVISIONS = ("", "unknown")


class ResolvedModel(Protocol):
    """What is read of an ``ascl.models.ModelRef`` here (not imported: this module stays a leaf)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def spec(self) -> str: ...


class ModelMismatchError(AsclError, ValueError):
    """One model's file or embeddings met another model (an export check, an add, a build, a search);
    the message names both."""


def differences(recorded: Mapping[str, Any], other: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
    """The one comparison of identities: the keys of ``keys`` on which two records disagree."""
    return [key for key in keys if recorded.get(key) != other.get(key)]


@functools.lru_cache(maxsize=32)
def _sha1_cached(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns
    return file_digest(path, "sha1")


def model_identity(onnx_path: str | os.PathLike[str], ref: ResolvedModel | None = None,
                   metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """What manifests record about the model behind ``onnx_path`` (``ref``: the resolved spec, when known).

    Keys: ``name``, ``kind``, ``spec``, ``weights`` (the identity), ``revision`` (the ONNX's
    ``ascl.source_revision``), ``dim``, ``precision``, ``image_size``, ``onnx`` (absolute path)
    and ``sha1`` (of the ONNX file). ``metadata``: the ONNX metadata when already read (an
    ``OnnxEmbedder`` has it).
    """
    path = Path(onnx_path).resolve()
    stat = path.stat()
    meta = metadata if metadata is not None else onnx_metadata(path)
    sha1 = _sha1_cached(str(path), stat.st_size, stat.st_mtime_ns)
    name = meta.get(MODEL_NAME_KEY) or (ref.name if ref is not None else path.stem)
    revision = meta.get(SOURCE_REVISION_KEY, "")
    if revision.startswith("sha256:"):
        weights = revision
    elif revision not in UNKNOWN_REVISIONS:
        weights = f"{name}@{revision}"  # a hub revision: names the weights together with the repo
    else:
        weights = f"onnx-sha1:{sha1}"
    dim = meta.get(EMBEDDING_DIM_KEY)
    size = meta.get(IMAGE_SIZE_KEY)
    return {
        "name": name,
        "kind": ref.kind if ref is not None else "onnx",
        "spec": ref.spec if ref is not None else str(onnx_path),
        "weights": weights,
        "revision": revision or "unknown",
        "dim": int(dim) if dim else None,
        "precision": meta.get(PRECISION_KEY, "fp32"),
        "image_size": int(size) if size else None,
        "onnx": str(path),
        "sha1": sha1,
    }


def describe_model(model: dict[str, Any]) -> str:
    """One line naming a recorded model: name, weights, dim, precision."""
    name = model.get("name") or (Path(str(model["onnx"])).name if model.get("onnx") else "an unnamed model")
    weights = model.get("weights") or (f"onnx-sha1:{model['sha1']}" if model.get("sha1") else "unknown weights")
    dim = f", {model['dim']}-d" if model.get("dim") else ""
    precision = f", {model['precision']}" if model.get("precision") else ""
    return f"{name} (weights {weights}{dim}{precision})"


def _upgraded(model: dict[str, Any]) -> dict[str, Any]:
    """A record written before identities (only ``onnx`` and ``sha1``): its file's identity when the file is there."""
    if model.get("weights") or not model.get("onnx"):
        return model
    path = Path(str(model["onnx"]))
    if not path.is_file():
        return model
    try:
        identity = model_identity(path)
    except Exception:  # an unreadable old file: fall back to its recorded hash
        return model
    return identity if identity["sha1"] == model.get("sha1", identity["sha1"]) else model


def same_model(recorded: dict[str, Any], model: dict[str, Any]) -> bool:
    """Whether ``model`` makes the same embeddings as the ``recorded`` one (weights and dim)."""
    old, new = _upgraded(recorded), _upgraded(model)
    if old.get("weights") and new.get("weights"):
        keys = ("weights", "dim") if old.get("dim") and new.get("dim") else ("weights",)
        return not differences(old, new, keys)
    if old.get("sha1") and new.get("sha1"):
        return not differences(old, new, ("sha1",))
    return True  # nothing recorded to compare with (an index made without a model record)


def ensure_same_model(recorded: dict[str, Any] | None, model: dict[str, Any], where: str) -> None:
    """Raise ModelMismatchError (exit 2) naming both models when ``model`` is not the ``recorded`` one.

    ``where``: what holds the recorded embeddings, for the message (``index IDX``, ``embedding
    set DIR``). A missing or empty record passes.
    """
    if not recorded or same_model(recorded, model):
        return
    raise ModelMismatchError(
        f"{where} was built with another model: it holds embeddings of {describe_model(_upgraded(recorded))}, "
        f"not of {describe_model(model)}; "
        "embeddings of different models cannot be mixed or searched together. Use the model it was made with "
        "(or an fp16/int8 export of the same weights), or write a new one with another --out"
    )
