"""Training checkpoints: atomic writes and exact resume.

A checkpoint is a dict of tensors and primitives: the framework state (encoder, momentum twins,
heads, queue), optimiser, scheduler, RNG states, position (epoch, batch, step) and the resolved
config. Its format and reading (``load_checkpoint``, ``encoder_from_checkpoint``) live in the
core, ``ascl.checkpoints``, so that other layers can read a run without importing training.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ascl.atomic import atomic_path
from ascl.checkpoints import (
    ENCODER_PREFIX,
    FORMAT,
    VERSION,
    CheckpointError,
    describe_config,
    encoder_from_checkpoint,
    find_checkpoint,
    load_checkpoint,
    load_strict,
)
from ascl.encoder import Encoder

__all__ = [
    "ENCODER_PREFIX", "CheckpointError", "encoder_from_checkpoint", "find_checkpoint", "load_checkpoint", "restore",
    "save_checkpoint", "training_state",
]

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


def restore(
    state: dict[str, Any], path: Path, framework: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    encoder: Encoder,
) -> tuple[int, int, int]:
    """Load a checkpoint into a freshly built run; returns (epoch, batch, step) to continue from."""
    load_strict(framework, state["model"], path, f"this run's model ({describe_config(encoder.config())})",
                describe_config(state["encoder_config"]))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["epoch"]), int(state["batch"]), int(state["step"])
