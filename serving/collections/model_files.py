"""Turn a ``--model`` argument into an ONNX file the index builder and the server can run.

The spec is resolved by the core (``ascl.models.resolve_model``: an ``.onnx`` file, a run
folder or checkpoint, a hub folder, a shipped name, a hub repo id) and exported once into the
content-keyed cache of ``ascl.export.cache``.
"""

from __future__ import annotations

from pathlib import Path

from ascl.export.cache import cached_onnx

__all__ = ["cached_onnx", "resolve_onnx"]
from ascl.models import resolve_model


def resolve_onnx(spec: str | None, *, cache: str | Path | None = None, refresh: bool = False) -> Path:
    """An ONNX file for ``spec`` (None: the shipped default), exporting and caching it when needed."""
    onnx_path, _ = cached_onnx(resolve_model(spec), cache=cache, refresh=refresh)
    return onnx_path
