"""Which encoder ``ascl up`` serves, and its ONNX export cached under a key of its weights.

With no ``--model``, a newcomer gets the best encoder this machine has, and is told which:
the shipped pretrained default (``ascl.model_cards.registry.DEFAULT_MODEL``, trained on a 2-core
CPU and shipped in ``model_cards/``) when its weights are here; else the newest local training
run (``runs/*/checkpoints/last.pt``); else, as the last resort, a seeded, randomly initialised
ResNet-18, with a loud warning (its features group images by colour, not by object).

The export is keyed by a hash of the weight files (not their paths), so a retrained
checkpoint is exported again and an unchanged one never is. Computing the key needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ascl.atomic import atomic_write_text
from ascl.demo.gallery import file_sha256

if TYPE_CHECKING:
    from ascl.encoder import Encoder

RANDOM_SEED = 0
RUNS_DIR = Path("runs")
CHECKPOINT_GLOB = "*/checkpoints/last.pt"
WEIGHT_SUFFIXES = (".safetensors", ".json", ".pt", ".pth")


@dataclass(frozen=True)
class ModelChoice:
    """What to load (``spec`` for ``ascl.hub.load_encoder``; None = the seeded random encoder)."""

    spec: str | None
    key: str  # cache key: changes whenever the weights do
    description: str  # one line for the screen
    warning: str | None = None  # shown loudly when the model is not a trained one


def newest_run(runs_dir: Path = RUNS_DIR) -> Path | None:
    """The most recently written ``last.pt`` under ``runs_dir``, if any."""
    checkpoints = sorted(runs_dir.glob(CHECKPOINT_GLOB), key=lambda p: p.stat().st_mtime)
    return checkpoints[-1] if checkpoints else None


def weights_key(path: Path) -> str:
    """A short hash of a checkpoint file, or of the weight and config files of a folder."""
    if path.is_file():
        return file_sha256(path)[:16]
    run_checkpoint = path / "checkpoints" / "last.pt"
    if run_checkpoint.is_file():
        return file_sha256(run_checkpoint)[:16]
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()[:16]


def choose_model(spec: str | None, runs_dir: Path = RUNS_DIR) -> ModelChoice:
    """Resolve ``--model`` (or its absence) to a ``ModelChoice``; nothing heavy is loaded."""
    from ascl.model_cards.registry import DEFAULT_MODEL, lookup

    if spec:
        shipped = lookup(spec)  # a registered name, or "default"
        if shipped is not None and shipped.is_shipped():
            folder = shipped.folder()
            return ModelChoice(str(folder), f"{shipped.name}-{weights_key(folder)}",
                               f"{shipped.name} (shipped weights in {folder})")
        path = Path(spec).expanduser()
        if path.exists():
            return ModelChoice(str(path), f"local-{weights_key(path)}", f"{path}")
        # a hub repo id or a registered name to download: keyed by name, refreshed with --refresh
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)
        return ModelChoice(spec, f"hub-{safe}", f"{spec} (from the Hugging Face Hub)")
    default = lookup(DEFAULT_MODEL)
    if default is not None and default.is_shipped():
        folder = default.folder()
        return ModelChoice(str(folder), f"{DEFAULT_MODEL}-{weights_key(folder)}",
                           f"{DEFAULT_MODEL}, the pretrained default (shipped in {folder})")
    checkpoint = newest_run(runs_dir)
    if checkpoint is not None:
        run = checkpoint.parents[1]
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(checkpoint.stat().st_mtime))
        return ModelChoice(
            str(checkpoint), f"run-{weights_key(checkpoint)}",
            f"your newest training run {run} (last.pt of {stamp})",
            warning=(f"The pretrained model {DEFAULT_MODEL} is not available here yet, so this uses your newest "
                     f"local training run, {run}. Pass --model NAME_OR_PATH to choose another."),
        )
    return ModelChoice(
        None, f"random-resnet18-cifar-seed{RANDOM_SEED}",
        "a RANDOMLY INITIALISED ResNet-18 (seed 0): no trained weights",
        warning=(f"NO TRAINED MODEL FOUND: neither the pretrained {DEFAULT_MODEL} nor a training run under "
                 f"{runs_dir}/ exists, so this demo uses a randomly initialised ResNet-18 (seed {RANDOM_SEED}). "
                 "Results match colours and textures, not objects. Train one with 'ascl train' (it lands in "
                 "runs/ and the next 'ascl up' picks it up) or pass --model NAME_OR_PATH."),
    )


def load_choice(choice: ModelChoice) -> Encoder:
    """The Encoder for ``choice`` (imports torch)."""
    import torch

    from ascl.encoder import Encoder as EncoderClass

    if choice.spec is None:
        torch.manual_seed(RANDOM_SEED)
        return EncoderClass().eval()
    from ascl.hub import load_encoder

    return load_encoder(choice.spec)


def ensure_onnx(choice: ModelChoice, cache: Path, *, refresh: bool = False) -> tuple[Path, bool]:
    """The cached ONNX export of ``choice``, exporting it first when missing.

    Returns (path, exported_now). The export is written atomically, so an interrupted start
    leaves no half file that a later start would trust.
    """
    folder = cache / "models" / choice.key
    onnx_path = folder / "encoder.onnx"
    if onnx_path.is_file() and not refresh:
        return onnx_path, False
    from ascl.export.onnx_export import export_onnx

    encoder = load_choice(choice)
    export_onnx(encoder, onnx_path, model_name=choice.spec or "random-resnet18", source_revision=choice.key)
    atomic_write_text(folder / "model.json", json.dumps({"spec": choice.spec, "key": choice.key,
                                                         "description": choice.description}, indent=2) + "\n")
    return onnx_path, True
