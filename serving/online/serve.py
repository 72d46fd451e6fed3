"""The one way to serve a model: ``ascl serve``, ``ascl up`` and the in-process gallery go through it.

1. ``choose_model(spec, index=...)``: which model, by the one default rule (below).
2. ``served_model(choice, precision, ...)``: the ONNX file to serve, from the one export cache
   (``ascl.export.cache``: every export checked against PyTorch before its first use; int8
   quantized once, verified against fp32 and refused below ``--min-recall``), checked against
   the index's model, its facts read once, and one line describing it.
3. ``check_ports_free(ports)`` (``ascl.serving.online.ports``): once, before any slow step,
   naming the flag to change.
4. ``start_service(served, index, repository, ...)``: the model repository and the supervised
   service (Triton behind the front door), returning once a search goes through.

The default model, when ``--model`` is not given: the model the index was built with (its
ONNX file, when still on this machine); else the shipped pretrained default
(``ascl.registry.DEFAULT_MODEL``) when its weights are here; else the newest local training
run (``runs/*/checkpoints/last.pt``); else, as the last resort, a seeded, randomly initialised
ResNet-18 with a loud warning (its features group images by colour, not by object).

The default calibration of int8: ``ascl.serving.online.precision.default_calibration`` (the
index's own images, else the CIFAR-10 copy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ascl import registry
from ascl.models import ModelRef, resolve_model
from ascl.serving.online.ports import check_ports_free

if TYPE_CHECKING:
    from ascl.export.runtime import OnnxFacts
    from ascl.serving.collections.index import IndexSpec
    from ascl.serving.online.limits import Limits
    from ascl.serving.online.repository import Batching
    from ascl.serving.online.service import SearchService

__all__ = ["ModelChoice", "ServedModel", "check_ports_free", "choose_model", "ensure_onnx", "newest_run",
           "served_model", "start_service"]

RANDOM_SEED = 0
RUNS_DIR = Path("runs")
CHECKPOINT_GLOB = "*/checkpoints/last.pt"
KEY_PREFIX = {"shipped": "shipped", "hub_folder": "local", "run_folder": "run", "checkpoint": "run",
              "hub_repo": "hub", "onnx": "onnx", "random": "random"}


@dataclass(frozen=True)
class ModelChoice:
    """The model to serve: its resolved ref, one line for the screen, and a warning when untrained."""

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


def choose_model(spec: str | None, *, index: IndexSpec | None = None, runs_dir: Path = RUNS_DIR) -> ModelChoice:
    """Resolve ``--model`` (or its absence, by the one default rule of the module doc); nothing heavy is loaded."""
    if spec:
        ref = resolve_model(spec)
        return ModelChoice(ref, ref.description)
    if index is not None:
        from ascl.serving.collections.index import recorded_onnx

        onnx = recorded_onnx(index)
        if onnx is not None:
            ref = resolve_model(str(onnx))
            return ModelChoice(ref, f"{ref.description}, the model {index} was built with")
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
                 f"{runs_dir}/ exists, so this uses a randomly initialised ResNet-18 (seed {RANDOM_SEED}). "
                 "Results match colours and textures, not objects. Train one with 'ascl train' (it lands in "
                 "runs/ and the next start picks it up) or pass --model NAME_OR_PATH."),
    )


def ensure_onnx(choice: ModelChoice, cache: str | Path | None = None, *, refresh: bool = False,
                precision: str = "fp32", calibration: str | None = None,
                min_recall: float | None = None) -> tuple[Path, bool]:
    """(the ONNX export of ``choice`` in the export cache, whether it was made just now); int8: the
    calibrated copy, verified against fp32 (refused below ``min_recall``)."""
    from ascl.export.cache import cached_onnx

    return cached_onnx(choice.ref, cache=cache, refresh=refresh, precision=precision, calibration=calibration,
                       min_recall=min_recall)


@dataclass(frozen=True)
class ServedModel:
    """The ONNX file a server runs, what it is, and one line for the screen."""

    choice: ModelChoice
    onnx: Path
    facts: OnnxFacts  # image size, embedding dim, precision: read once
    description: str
    made_now: bool = False
    index: IndexSpec | None = None  # the index it was checked against

    @property
    def precision(self) -> str:
        return self.facts.precision


def served_model(choice: ModelChoice, precision: str = "fp32", *, index: IndexSpec | None = None,
                 calibration: str | None = None, min_recall: float | None = None,
                 cache: str | Path | None = None, refresh: bool = False) -> ServedModel:
    """The ONNX file that serves ``choice`` at ``precision`` (fp32 or int8), from the export cache.

    With ``index``, the model is checked against the index's (ModelMismatchError, exit 2) before
    any int8 work, and int8 calibrates on ``calibration`` or, without it, by the one default
    rule (``precision.default_calibration``). Raises PrecisionRefusedError (exit 2) for an int8
    copy below ``min_recall``.
    """
    from ascl.export.cache import describe_int8
    from ascl.export.runtime import onnx_facts
    from ascl.names import PRECISIONS

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    onnx, made = ensure_onnx(choice, cache, refresh=refresh)
    if index is not None:
        from ascl.serving.collections.index import as_spec, ensure_index_model

        index = as_spec(index)
        ensure_index_model(index, onnx)
    if precision == "int8":
        from ascl.serving.online.precision import default_calibration

        source = calibration or default_calibration(index)
        onnx, made = ensure_onnx(choice, cache, refresh=refresh, precision="int8", calibration=source,
                                 min_recall=min_recall)
    facts = onnx_facts(onnx)
    description = describe_int8(onnx, made, min_recall) if facts.precision == "int8" else f"fp32 ({onnx})"
    return ServedModel(choice, onnx, facts, description, made, index)


def start_service(served: ServedModel, index: IndexSpec, repository: str | Path, *, grpc_port: int,
                  http_port: int, metrics_port: int, host: str = "127.0.0.1",
                  log_path: str | Path | None = None, verbose: bool = False,
                  start_timeout_s: float = 180.0, batching: Batching | None = None,
                  limits: Limits | None = None) -> SearchService:
    """Write the embedded model repository to ``repository`` and start the search service on the ports.

    Returns once Triton reports every model ready. ``batching``: the models' queue delays and
    instances (``repository.Batching``; default: no delay, one instance per core). ``limits``: what
    clients may claim of the front door (``limits.Limits``; default: its defaults), the request
    size limit written into the repository too. The service is Triton behind the front door
    (inference, health and metadata only), restarted by its supervisor if it or a stub dies. The search model reads ``index`` in place, so images
    added to it are served without a restart. Raises ServerError when it does not start.
    """
    from ascl.serving.collections.index import as_spec, ensure_index_model
    from ascl.serving.online.limits import Limits
    from ascl.serving.online.repository import write_repository
    from ascl.serving.online.service import SearchService

    index = as_spec(index)
    if served.index != index:
        ensure_index_model(index, served.onnx)
    limits = limits or Limits()
    write_repository(repository, served.onnx, index, max_request_bytes=limits.max_request_bytes, facts=served.facts,
                     batching=batching)
    service = SearchService(repository, host=host, grpc_port=grpc_port, http_port=http_port,
                            metrics_port=metrics_port, limits=limits, log_path=log_path,
                            verbose=verbose, start_timeout_s=start_timeout_s)
    return service.start()
