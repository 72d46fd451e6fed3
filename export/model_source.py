"""Resolve the MODEL argument of ``ascl export`` to an Encoder plus the facts stamped into the graph."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ascl.encoder import Encoder


class ModelLoadError(ValueError):
    """MODEL does not name an encoder we can load; the message says what was tried."""


@dataclass
class LoadedModel:
    encoder: Encoder
    name: str  # stored as ascl.model_name
    revision: str  # stored as ascl.source_revision: hub revision, or a content hash of local weights


def _content_revision(path: Path) -> str:
    """sha256 (first 16 hex digits) of the weight files, so an export names the exact weights."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pt", ".pth")
    )
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:16]}" if files else "unknown"


def _model_name(spec: str, path: Path) -> str:
    if not path.exists():
        return spec  # a registered name or a hub repo id
    if path.is_file():
        # runs/<name>/checkpoints/last.pt -> <name>
        return path.parents[1].name if path.parent.name == "checkpoints" else path.stem
    return path.resolve().name


def load_model(spec: str, *, revision: str | None = None) -> LoadedModel:
    """Anything ``ascl.hub.load_encoder`` accepts -> the encoder in eval mode, its name and revision.

    Raises ModelLoadError (naming ``spec``) when it is not a loadable encoder.
    """
    from ascl.hub import load_encoder

    path = Path(spec).expanduser()
    try:
        encoder = load_encoder(spec, revision=revision)
    except Exception as exc:  # any failure to build the encoder (bad pickle, bad config, ...) is the input's fault
        raise ModelLoadError(
            f"{spec}: not a loadable encoder ({exc}). MODEL must be a training checkpoint (.pt) or run "
            "folder, a hub folder (config.json + model.safetensors), a registered model name or a hub repo id."
        ) from exc
    encoder.eval()
    rev = revision or (_content_revision(path) if path.exists() else "main")
    return LoadedModel(encoder, _model_name(spec, path), rev)
