"""The one cache of ONNX exports, keyed by the content of the weights.

``cached_onnx(ref)`` gives the ONNX file of any resolved model (``ascl.models.ModelRef``): an
``.onnx`` spec as it is; anything else exported once into
``<cache>/models/<content key>/encoder.onnx``. The key is a hash of the weight bytes, so a
retrained checkpoint is exported again and an unchanged one never is, wherever it lives. The
export is written atomically: an interrupted start leaves no half file that a later start
would trust. ``ascl serve``, ``ascl index`` and ``ascl up`` share it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ascl.atomic import atomic_write_text
from ascl.cache import cache_dir
from ascl.models import ModelRef

ONNX_NAME = "encoder.onnx"
RECORD_NAME = "model.json"


def export_folder(ref: ModelRef, cache: str | Path | None = None) -> Path:
    """Where the export of ``ref`` lives (or will live) in the cache."""
    return cache_dir(cache) / "models" / ref.content_key


def cached_onnx(ref: ModelRef, *, cache: str | Path | None = None, refresh: bool = False) -> tuple[Path, bool]:
    """(the ONNX file of ``ref``, whether it was exported just now); ``refresh`` exports again."""
    if ref.onnx_path is not None:
        return ref.onnx_path, False
    folder = export_folder(ref, cache)
    onnx_path = folder / ONNX_NAME
    if onnx_path.is_file() and not refresh:
        return onnx_path, False
    from ascl.export.onnx_export import export_onnx

    export_onnx(ref.load_encoder(), onnx_path, model_name=ref.name, source_revision=ref.source_revision)
    record = {"spec": ref.spec, "kind": ref.kind, "name": ref.name, "key": ref.content_key,
              "description": ref.description}
    atomic_write_text(folder / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    return onnx_path, True
