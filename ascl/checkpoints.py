"""Reading the checkpoints that ``ascl train`` writes: their format, and the Encoder inside.

A checkpoint is a dict of tensors and primitives, read back with ``torch.load(weights_only=True)``
(never unpickling arbitrary objects). Writing and resuming are training's business
(``ascl.training.checkpoint``); reading the shipped Encoder out of one is the model layer's, so
that export, serving and the demo can take a run folder without importing training.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ascl.errors import AsclError

if TYPE_CHECKING:  # torch is imported by the functions that need it: resolving a spec needs none
    import torch
    from torch import nn

    from ascl.encoder import Encoder

FORMAT = "ascl-train-checkpoint"
VERSION = 1
ENCODER_PREFIX = "encoder."
CHECKPOINT_SUFFIXES = (".pt", ".pth")
LAST = "last.pt"
RUN_FILES = ("config.yaml", "metrics.csv", "run.json")  # what ascl train writes beside its checkpoints


class CheckpointError(AsclError, ValueError):
    """A file that is not a usable ASCL checkpoint; the message names it and says why."""


def find_checkpoint(path: str | Path) -> Path:
    """A ``.pt`` file as is; a run folder -> its ``checkpoints/last.pt`` (or ``last.pt``)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / LAST, path / LAST):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: no checkpoints/last.pt in this folder; is it a run folder of 'ascl train'?")
    raise CheckpointError(f"{path}: no such checkpoint file or run folder")


def run_folder_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/x.pt`` or ``<run>/last.pt``), or None."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parents[1]
    if any((checkpoint.parent / name).is_file() for name in RUN_FILES):
        return checkpoint.parent
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one of our checkpoints (weights_only=True); clear errors for anything else."""
    import torch

    path = find_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read as a checkpoint (truncated or not a torch file?): {exc}") from exc
    except Exception as exc:  # weights_only refusals raise pickle.UnpicklingError
        raise CheckpointError(f"{path}: refused to load (not a plain-tensor checkpoint): {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an ASCL training checkpoint (made by 'ascl train')")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not supported (expected {VERSION})")
    return state


def describe_config(cfg: dict[str, Any]) -> str:
    """``arch=..., stem=..., image_size=...`` of an encoder config, for error messages."""
    return f"arch={cfg.get('arch')}, stem={cfg.get('stem')}, image_size={cfg.get('image_size')}"


def load_strict(module: nn.Module, weights: dict[str, torch.Tensor], path: Path, what: str, saved: str) -> None:
    """load_state_dict(strict=True) with an error that names the file and both architectures."""
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(
            f"{path}: weights do not fit {what} (checkpoint: {saved}); another architecture? {' '.join(first)}"
        ) from exc


def encoder_from_checkpoint(path: str | Path) -> Encoder:
    """The shipped Encoder of a training checkpoint or run folder, every weight loaded (strict)."""
    from ascl.encoder import Encoder

    ckpt_path = find_checkpoint(path)
    state = load_checkpoint(ckpt_path)
    cfg = state["encoder_config"]
    try:
        encoder = Encoder(**cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt_path}: bad encoder config {cfg}: {exc}") from exc
    weights = {k[len(ENCODER_PREFIX) :]: v for k, v in state["model"].items() if k.startswith(ENCODER_PREFIX)}
    load_strict(encoder, weights, ckpt_path, f"Encoder({describe_config(cfg)})", describe_config(cfg))
    return encoder.eval()
