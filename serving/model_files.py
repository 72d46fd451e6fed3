"""Turn a ``--model`` argument into an ONNX file the index builder and the server can run.

An exported ``.onnx`` file is used as is. Anything else (a training checkpoint or run folder, a
hub folder, a shipped model name, a hub repo id) is resolved by ``ascl.hub.load_encoder`` and
exported once into a cache keyed by the spec and its modification time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ascl.cache import cache_dir


def _spec_key(spec: str) -> str:
    path = Path(spec)
    stamp = ""
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        stamp = ";".join(f"{p}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files[:200])
        spec = str(path.resolve())
    return hashlib.sha1(f"{spec}|{stamp}".encode()).hexdigest()[:16]


def resolve_onnx(spec: str) -> Path:
    """An ONNX file for ``spec``, exporting (and caching) it when ``spec`` is not one already."""
    path = Path(spec)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: no such ONNX file; export one with 'ascl export onnx MODEL --out DIR'")
        return path.resolve()
    if path.is_dir() and (path / "model.onnx").is_file() and not (path / "config.json").is_file():
        return (path / "model.onnx").resolve()
    out = cache_dir() / "onnx" / f"{_spec_key(spec)}.onnx"
    if out.is_file():
        return out
    encoder = load_encoder(spec)
    from ascl.export.onnx_export import export_onnx

    return export_onnx(encoder.eval(), out, model_name=spec)


def load_encoder(spec: str) -> Any:
    """The Encoder named by ``spec``: through ``ascl.hub`` when present, else a checkpoint."""
    try:
        from ascl.hub import load_encoder as hub_load
    except ImportError:
        pass
    else:
        return hub_load(spec)
    try:
        from ascl.training.checkpoint import encoder_from_checkpoint
    except ImportError as exc:
        raise FileNotFoundError(f"{spec}: cannot resolve a model (pass an exported .onnx file)") from exc
    if not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: no such model file or folder; pass an .onnx file or a training run")
    return encoder_from_checkpoint(spec)
