"""Load and save encoders by any name a user has for them.

``load_encoder`` is the one entry point every part of the project uses to get an encoder
(export, serving, the demo): a training checkpoint or run folder, a hub folder, a model
name registered in ``ascl.model_cards.registry``, or a hub repo id. ``save_encoder`` writes a
hub folder atomically, with the project's model card.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ascl.atomic import atomic_dir
from ascl.hub_mixin import CONFIG_FILE, ConfigError, ModelNotFoundError
from ascl.weights import DEFAULT_MAX_SHARD_SIZE, WeightsError

if TYPE_CHECKING:
    from ascl.encoder import Encoder
    from ascl.model_cards.card import CardFacts

__all__ = ["ConfigError", "ModelNotFoundError", "WeightsError", "is_hub_folder", "load_encoder", "save_encoder"]

CHECKPOINT_SUFFIXES = (".pt", ".pth")


def is_hub_folder(path: Path) -> bool:
    """True for a folder written by ``save_pretrained`` (config.json beside the weights)."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a repo id: explicit paths, checkpoints, or under an existing local folder."""
    if spec.startswith((".", "/", "~")) or spec.endswith(CHECKPOINT_SUFFIXES) or spec.count("/") > 1:
        return True
    parent = Path(spec).parent
    return parent != Path(".") and parent.is_dir()


def load_encoder(spec: str | Path | None = None, *, revision: str | None = None) -> Encoder:
    """The encoder named by ``spec``, in eval mode, on the CPU; None means ``default``.

    ``spec`` is tried in this order: a training checkpoint (``.pt``) or run folder; a hub
    folder (config.json + safetensors); a registered model name (``default``, the shipped
    ``ascl-resnet18w16-cifar10-cpu``, ...: the shipped folder when it holds the weights, else
    its hub repo); a hub repo id ``USER/NAME`` (at ``revision``, or the cache when
    ``HF_HUB_OFFLINE=1``). Errors say what was tried.
    """
    from ascl.encoder import Encoder
    from ascl.model_cards.registry import DEFAULT_ALIAS

    text = str(spec) if spec is not None else DEFAULT_ALIAS
    path = Path(text).expanduser()
    if path.is_file() and path.name.endswith(".safetensors") and is_hub_folder(path.parent):
        path = path.parent  # a weight file of a hub folder: load the folder it belongs to
    if path.is_file() or (path.is_dir() and not is_hub_folder(path)):
        if revision is not None:
            raise ValueError(f"--revision applies to hub repos only, not to the local path {path}")
        return _from_checkpoint(path)
    if is_hub_folder(path):
        return Encoder.from_folder(path)
    if _looks_like_path(text):
        raise FileNotFoundError(f"{path} does not exist (expected a checkpoint .pt, a run folder or a hub folder)")
    return Encoder.from_pretrained(text, revision=revision)


def _from_checkpoint(path: Path) -> Encoder:
    """A training checkpoint or run folder -> its encoder (``ascl.training.checkpoint``)."""
    try:
        from ascl.training.checkpoint import encoder_from_checkpoint, find_checkpoint
    except ImportError as e:  # pragma: no cover - only while the training package is incomplete
        raise RuntimeError(f"cannot read training checkpoints: ascl.training.checkpoint is unavailable ({e})") from e
    encoder = encoder_from_checkpoint(find_checkpoint(path))
    encoder.eval()
    return encoder


def save_encoder(
    encoder: Encoder,
    folder: str | Path,
    *,
    facts: CardFacts | None = None,
    extra_files: Mapping[str, Path] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a hub folder: config.json, safetensors (sharded above ``max_shard_size``), README.md.

    The card is rendered from ``facts`` (``ascl.model_cards.card.CardFacts``; the encoder's
    own config when None). ``extra_files`` (name in the folder -> source path), e.g. the card's
    plots, are copied in. The folder is replaced as a whole or not at all.
    """
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        card = encoder.generate_model_card(facts=facts) if facts is not None else encoder.generate_model_card()
        card.save(tmp / "README.md")
        for name, source in (extra_files or {}).items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"extra file name {name!r} must be relative to the hub folder")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
        encoder.save_pretrained(tmp, max_shard_size=max_shard_size)
    return folder
