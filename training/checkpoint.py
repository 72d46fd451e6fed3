"""Training checkpoints: atomic writes, exact resume, and the Encoder that ships from them.

A checkpoint is a dict of tensors and primitives, read back with ``torch.load(weights_only=True)``
(never unpickling arbitrary objects): the framework state (encoder, momentum twins, heads,
queue), optimiser, scheduler, RNG states, position (epoch, batch, step) and the resolved config.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ascl.atomic import atomic_path
from ascl.encoder import Encoder

FORMAT = "ascl-train-checkpoint"
VERSION = 1
ENCODER_PREFIX = "encoder."


class CheckpointError(ValueError):
    """A file that is not a usable ASCL checkpoint; the message names it and says why."""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any], copies: tuple[Path, ...] = ()) -> Path:
    """Write ``state`` atomically to ``path`` (then to each of ``copies``); readers never see half a file."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    for extra in copies:
        with atomic_path(extra) as tmp:
            shutil.copyfile(path, tmp)
    return path


def training_state(
    framework: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
    config: dict[str, Any], encoder: Encoder, epoch: int, batch: int, step: int, train_seconds: float = 0.0,
) -> dict[str, Any]:
    """Everything ``--resume`` needs to continue exactly (and the training time spent so far)."""
    return {
        "config": config,
        "encoder_config": encoder.config(),
        "model": framework.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "epoch": epoch,
        "batch": batch,
        "step": step,
        "train_seconds": float(train_seconds),
    }


def find_checkpoint(path: str | Path) -> Path:
    """A ``.pt`` file as is; a run folder -> its ``checkpoints/last.pt`` (or ``last.pt``)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: no checkpoints/last.pt in this folder; is it a run folder of 'ascl train'?")
    raise CheckpointError(f"{path}: no such checkpoint file or run folder")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one of our checkpoints (weights_only=True); clear errors for anything else."""
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


def _describe(cfg: dict[str, Any]) -> str:
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
    ckpt_path = find_checkpoint(path)
    state = load_checkpoint(ckpt_path)
    cfg = state["encoder_config"]
    try:
        encoder = Encoder(**cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt_path}: bad encoder config {cfg}: {exc}") from exc
    weights = {k[len(ENCODER_PREFIX) :]: v for k, v in state["model"].items() if k.startswith(ENCODER_PREFIX)}
    load_strict(encoder, weights, ckpt_path, f"Encoder({_describe(cfg)})", _describe(cfg))
    return encoder.eval()


def restore(
    state: dict[str, Any], path: Path, framework: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    encoder: Encoder,
) -> tuple[int, int, int]:
    """Load a checkpoint into a freshly built run; returns (epoch, batch, step) to continue from."""
    load_strict(framework, state["model"], path, f"this run's model ({_describe(encoder.config())})",
                _describe(state["encoder_config"]))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["epoch"]), int(state["batch"]), int(state["step"])
