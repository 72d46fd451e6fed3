"""Which encoder ``ascl up`` serves when no ``--model`` is given, and what it says about it.

With no ``--model``, a newcomer gets the best encoder this machine has, and is told which:
the shipped pretrained default (``ascl.registry.DEFAULT_MODEL``, trained on a 2-core CPU and
shipped in ``model_cards/``) when its weights are here; else the newest local training run
(``runs/*/checkpoints/last.pt``); else, as the last resort, a seeded, randomly initialised
ResNet-18 (``random``), with a loud warning (its features group images by colour, not by
object). Any ``--model`` is resolved by the core (``ascl.models.resolve_model``); the export
comes from the serving seam's content-keyed cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ascl import registry
from ascl.models import ModelRef, resolve_model
from ascl.serving.online.gallery import model_onnx

RANDOM_SEED = 0
RUNS_DIR = Path("runs")
CHECKPOINT_GLOB = "*/checkpoints/last.pt"
KEY_PREFIX = {"shipped": "shipped", "hub_folder": "local", "run_folder": "run", "checkpoint": "run",
              "hub_repo": "hub", "onnx": "onnx", "random": "random"}


@dataclass(frozen=True)
class ModelChoice:
    """The model ``ascl up`` serves: its resolved ref, one line for the screen, and a warning when untrained."""

    ref: ModelRef
    description: str
    warning: str | None = None  # shown loudly when the model is not a trained one
    key: str = field(init=False)  # the weights' content key when chosen, with the kind in front

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{KEY_PREFIX[self.ref.kind]}-{self.ref.content_key}")

    @property
    def spec(self) -> str | None:
        """The local path of the weights (None for the seeded random encoder)."""
        return None if self.ref.path is None else str(self.ref.path)


def newest_run(runs_dir: Path = RUNS_DIR) -> Path | None:
    """The most recently written ``last.pt`` under ``runs_dir``, if any."""
    checkpoints = sorted(runs_dir.glob(CHECKPOINT_GLOB), key=lambda p: p.stat().st_mtime)
    return checkpoints[-1] if checkpoints else None


def choose_model(spec: str | None, runs_dir: Path = RUNS_DIR) -> ModelChoice:
    """Resolve ``--model`` (or its absence) to a ``ModelChoice``; nothing heavy is loaded."""
    if spec:
        ref = resolve_model(spec)
        return ModelChoice(ref, ref.description)
    default_name = registry.DEFAULT_MODEL
    default = registry.lookup(default_name)
    if default is not None and default.is_shipped():
        ref = resolve_model(default_name)
        return ModelChoice(ref, f"{default_name}, the pretrained default (shipped in {ref.path})")
    checkpoint = newest_run(runs_dir)
    if checkpoint is not None:
        ref = resolve_model(str(checkpoint))
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(checkpoint.stat().st_mtime))
        return ModelChoice(
            ref, f"your newest training run {ref.run_folder} (last.pt of {stamp})",
            warning=(f"The pretrained model {default_name} is not available here yet, so this uses your newest "
                     f"local training run, {ref.run_folder}. Pass --model NAME_OR_PATH to choose another."),
        )
    ref = resolve_model(f"random:{RANDOM_SEED}")
    return ModelChoice(
        ref, ref.description,
        warning=(f"NO TRAINED MODEL FOUND: neither the pretrained {default_name} nor a training run under "
                 f"{runs_dir}/ exists, so this demo uses a randomly initialised ResNet-18 (seed {RANDOM_SEED}). "
                 "Results match colours and textures, not objects. Train one with 'ascl train' (it lands in "
                 "runs/ and the next 'ascl up' picks it up) or pass --model NAME_OR_PATH."),
    )


def ensure_onnx(choice: ModelChoice, cache: Path, *, refresh: bool = False, precision: str = "fp32",
                calibration: str | None = None, min_recall: float | None = None) -> tuple[Path, bool]:
    """(the ONNX export of ``choice`` in the cache, whether it was exported just now); int8: the
    calibrated copy, verified against fp32 (refused below ``min_recall``)."""
    return model_onnx(choice.ref, cache=cache, refresh=refresh, precision=precision, calibration=calibration,
                      min_recall=min_recall)
