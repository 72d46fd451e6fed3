"""The one answer to "which model?": ``resolve_model(spec) -> ModelRef`` for every kind of spec.

Every ``--model`` option and every library entry point (``load_encoder``, export, the index
builder, the server, the demo, publishing) resolves its model here, in this order:

==============  ==========================================================================
kind            spec
==============  ==========================================================================
``onnx``        an exported ``.onnx`` file (or an export folder holding ``model.onnx``)
``hub_folder``  a folder written by ``save_pretrained`` (config.json + safetensors), or one
                of its weight files
``checkpoint``  a training checkpoint ``.pt`` (its run folder is found when there is one)
``run_folder``  a run folder of ``ascl train`` (its ``checkpoints/last.pt``)
``shipped``     a registered name (``default`` and the models in ``ascl.registry``) whose
                weights ship with the package: no network, unless a ``revision`` is asked for
``hub_repo``    a hub repo id ``USER/NAME`` (at ``revision``; from the cache when
                ``HF_HUB_OFFLINE=1``), or a registered name whose weights are not shipped
``random``      ``random`` or ``random:SEED``: a seeded, randomly initialised ResNet-18 (the
                demo's last resort, and a baseline)
==============  ==========================================================================

A ``ModelRef`` is cheap (no torch until ``load_encoder``) and carries a ``content_key``: a
hash of the weight bytes, not of paths or times, so caches of exports are keyed by what the
model is, and a retrained checkpoint is exported again while an unchanged one never is.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ascl.checkpoints import CHECKPOINT_SUFFIXES, find_checkpoint, run_folder_of
from ascl.digest import file_digest
from ascl.errors import AsclError
from ascl.pretrained import CONFIG_FILE, ModelNotFoundError, download_folder, is_hub_folder
from ascl.registry import DEFAULT_ALIAS, ShippedModel, lookup

if TYPE_CHECKING:
    from ascl.encoder import Encoder

__all__ = ["ModelKind", "ModelRef", "ModelSpecError", "load_encoder", "resolve_model"]

log = logging.getLogger(__name__)

ModelKind = Literal["onnx", "hub_folder", "checkpoint", "run_folder", "shipped", "hub_repo", "random"]
RANDOM = "random"
WEIGHT_SUFFIXES = (".safetensors", ".json", ".pt", ".pth", ".onnx")
ONNX_IN_FOLDER = "model.onnx"


class ModelSpecError(AsclError, FileNotFoundError):
    """A ``--model`` that names nothing loadable; the message lists what a spec may be."""


SPEC_HELP = (
    "a shipped model name ('default' = the shipped default, see 'ascl models'), a hub repo id USER/NAME, "
    "a hub folder (config.json + safetensors), a training run folder or checkpoint (.pt), an exported "
    ".onnx file, or 'random[:SEED]'"
)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: what it is, where its files are, and a key of its weights.

    ``path`` is the local file or folder that holds the weights (for ``hub_repo``: the
    downloaded snapshot); ``run_folder`` the training run it came from, when known.
    """

    spec: str  # what the user wrote
    kind: ModelKind
    name: str  # a short name: the shipped name, the repo id, the run or file name
    path: Path | None
    repo_id: str | None = None
    revision: str | None = None
    run_folder: Path | None = None
    seed: int = 0  # for kind "random"

    @property
    def description(self) -> str:
        """One line for the screen."""
        where = {
            "onnx": f"ONNX file {self.path}",
            "hub_folder": f"hub folder {self.path}",
            "checkpoint": f"checkpoint {self.path}",
            "run_folder": f"training run {self.run_folder}",
            "shipped": f"{self.name} (shipped weights in {self.path})",
            "hub_repo": f"{self.repo_id} from the Hugging Face Hub" + (f" at {self.revision}" if self.revision else ""),
            "random": f"a RANDOMLY INITIALISED ResNet-18 (seed {self.seed}): no trained weights",
        }
        return where[self.kind]

    @cached_property
    def content_key(self) -> str:
        """16 hex digits of sha256 over the weight files' names and bytes (what caches are keyed by)."""
        if self.kind == "random":
            return f"random-resnet18-cifar-seed{self.seed}"
        assert self.path is not None
        path = find_checkpoint(self.path) if self.kind == "run_folder" else self.path
        if path.is_file():
            return file_digest(path)[:16]
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\n".encode())
        return digest.hexdigest()[:16]

    @property
    def source_revision(self) -> str:
        """What an export records as its source: the hub revision asked for, else the content key."""
        return self.revision or f"sha256:{self.content_key}"

    @property
    def onnx_path(self) -> Path | None:
        """The ONNX file of an ``onnx`` ref (None for every other kind)."""
        return self.path if self.kind == "onnx" else None

    def load_encoder(self) -> Encoder:
        """The PyTorch Encoder, in eval mode, on the CPU (imports torch)."""
        from ascl.checkpoints import encoder_from_checkpoint
        from ascl.encoder import Encoder

        if self.kind == "random":
            import torch

            torch.manual_seed(self.seed)
            return Encoder().eval()
        if self.kind == "onnx":
            raise ModelSpecError(
                f"{self.path} is an exported ONNX graph, not PyTorch weights; pass the model it was exported "
                "from (a run folder, a hub folder, a shipped name or a hub repo id)"
            )
        assert self.path is not None
        if self.kind in ("checkpoint", "run_folder"):
            return encoder_from_checkpoint(self.path)
        return Encoder.from_folder(self.path)


def resolve_model(spec: str | Path | None = None, *, revision: str | None = None, from_hub: bool = False) -> ModelRef:
    """The ``ModelRef`` of ``spec`` (None: ``default``); see the module docstring for the order.

    Hub repos are downloaded (or found in the cache) here, so the ref's ``path`` is local.
    ``from_hub`` (``ascl pull``) asks the hub first even for a shipped name, falling back to the
    shipped copy, and fetches the whole repo (card and plots too). Errors say what was tried and
    what a spec may be.
    """
    text = str(spec) if spec is not None else DEFAULT_ALIAS
    if text == RANDOM or text.startswith(RANDOM + ":"):
        seed = text.partition(":")[2]
        if seed and not seed.isdigit():
            raise ModelSpecError(f"{text!r}: the seed of 'random:SEED' must be a whole number")
        return ModelRef(text, "random", text, None, seed=int(seed or 0))
    path = Path(text).expanduser()
    local = _resolve_local(text, path, revision)
    if local is not None:
        return local
    entry = lookup(text)
    if entry is not None:
        return _resolve_registered(text, entry, revision, from_hub=from_hub)
    if text.endswith(".onnx"):
        raise ModelSpecError(f"{text}: no such ONNX file; export one with 'ascl export onnx MODEL --out DIR'")
    if _looks_like_path(text):
        raise ModelSpecError(f"{path} does not exist; --model takes {SPEC_HELP}")
    folder = download_folder(text, revision=revision, everything=from_hub)
    return ModelRef(text, "hub_repo", text, folder, repo_id=text, revision=revision)


def load_encoder(spec: str | Path | None = None, *, revision: str | None = None) -> Encoder:
    """The encoder named by ``spec`` (None: the shipped default), in eval mode, on the CPU."""
    return resolve_model(spec, revision=revision).load_encoder()


def _resolve_local(text: str, path: Path, revision: str | None) -> ModelRef | None:
    """A ref for a spec naming a local file or folder, or None when it names none."""
    if not path.exists():
        return None
    if revision is not None:
        raise ModelSpecError(f"--revision applies to hub repos only, not to the local path {path}")
    if path.is_file() and path.suffix == ".onnx":
        return ModelRef(text, "onnx", path.stem, path)
    if path.is_file() and path.name.endswith(".safetensors") and is_hub_folder(path.parent):
        path = path.parent  # a weight file of a hub folder: the folder it belongs to
    if is_hub_folder(path):
        return ModelRef(text, "hub_folder", path.resolve().name, path)
    if path.is_dir() and (path / ONNX_IN_FOLDER).is_file() and not (path / CONFIG_FILE).is_file():
        return ModelRef(text, "onnx", path.resolve().name, path / ONNX_IN_FOLDER)
    if path.is_file():
        run = run_folder_of(path)
        name = run.resolve().name if run is not None else path.stem
        return ModelRef(text, "checkpoint", name, path, run_folder=run)
    find_checkpoint(path)  # a folder: a run folder, or a CheckpointError that says what is missing
    return ModelRef(text, "run_folder", path.resolve().name, path, run_folder=path)


def _resolve_registered(text: str, entry: ShippedModel, revision: str | None, *, from_hub: bool) -> ModelRef:
    """A registered name: the shipped folder when it holds the weights, else (or with a revision) the hub."""
    shipped = entry.folder()
    if entry.is_shipped() and revision is None and not from_hub:
        return ModelRef(text, "shipped", entry.name, shipped, repo_id=entry.repo_id)
    try:
        folder = download_folder(entry.repo_id, revision=revision, everything=from_hub)
    except ModelNotFoundError as e:
        if entry.is_shipped() and revision is None:
            log.warning("using the shipped copy of %r at %s: the hub could not provide it (%s)", text, shipped, e)
            return ModelRef(text, "shipped", entry.name, shipped, repo_id=entry.repo_id)
        raise ModelNotFoundError(
            f"model {text!r} is registered (hub repo {entry.repo_id}) but its weights are not shipped in "
            f"{shipped} and the hub could not provide them:\n  {e}\n"
            "Train one and ship it: ascl train --config cifar10_resnet18 (or your own config), then "
            f"ascl push runs/<name> --repo-id {entry.repo_id} --dry-run --max-shard-size 16MB --out {shipped}; "
            "or pass a training run folder or checkpoint instead of the name."
        ) from e
    return ModelRef(text, "hub_repo", entry.name, folder, repo_id=entry.repo_id, revision=revision)


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a repo id: explicit paths, checkpoints, ONNX files, or under a local folder."""
    if spec.startswith((".", "/", "~")) or spec.endswith((*CHECKPOINT_SUFFIXES, ".onnx")) or spec.count("/") > 1:
        return True
    parent = Path(spec).parent
    return parent != Path(".") and parent.is_dir()
