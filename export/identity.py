"""Which model made a set of embeddings, and the one check that embeddings never mix across models.

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

Only the standard library and ``ascl.errors`` at import; ONNX (or ONNX Runtime) loads to read
a file's metadata.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Protocol

from ascl.digest import file_digest
from ascl.errors import AsclError

__all__ = ["ModelMismatchError", "describe_model", "ensure_same_model", "model_identity", "same_model"]

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
    """Embeddings of one model met another model (an add, a build, a search); the message names both."""




def onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``ascl.*`` metadata of an ONNX file (cached per file path, size and modification time)."""
    stat = os.stat(path)
    return dict(_metadata(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=32)
def _metadata(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, str], ...]:
    del size, mtime_ns  # part of the cache key only
    try:
        import onnx

        model = onnx.load(path, load_external_data=False)
        props = {entry.key: entry.value for entry in model.metadata_props}
    except ImportError:  # a serving-only install: ONNX Runtime reads it too
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        props = dict(session.get_modelmeta().custom_metadata_map)
    return tuple(sorted(props.items()))


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
    name = meta.get("ascl.model_name") or (ref.name if ref is not None else path.stem)
    revision = meta.get("ascl.source_revision", "")
    if revision.startswith("sha256:"):
        weights = revision
    elif revision not in UNKNOWN_REVISIONS:
        weights = f"{name}@{revision}"  # a hub revision: names the weights together with the repo
    else:
        weights = f"onnx-sha1:{sha1}"
    dim = meta.get("ascl.embedding_dim")
    size = meta.get("ascl.image_size")
    return {
        "name": name,
        "kind": ref.kind if ref is not None else "onnx",
        "spec": ref.spec if ref is not None else str(onnx_path),
        "weights": weights,
        "revision": revision or "unknown",
        "dim": int(dim) if dim else None,
        "precision": meta.get("ascl.precision", "fp32"),
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
        dims = old.get("dim"), new.get("dim")
        return old["weights"] == new["weights"] and (None in dims or dims[0] == dims[1])
    if old.get("sha1") and new.get("sha1"):
        return bool(old["sha1"] == new["sha1"])
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
