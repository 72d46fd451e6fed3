"""The model-name registry: names this project ships, their hub repo ids and shipped folders.

``ascl.models.resolve_model("<name>")`` (and so ``load_encoder``, every ``--model`` option) looks
names up here. A registered model whose weights are shipped in ``model_cards/<name>/``
loads from that folder, with no network access (ask for a ``revision``, or pass the repo id,
to get the hub's copy); a registered model that is not shipped comes from its hub repo. The
name ``default`` is an alias of ``DEFAULT_MODEL``: what ``ascl up``, ``ascl serve``,
``ascl index`` and ``load_encoder()`` use when no model is given. Add a model by adding one
``ShippedModel`` below and, to ship its weights, a hub folder written by
``ascl push --dry-run --out model_cards/<name>``.

The shipped folders are package data of ``ascl.model_cards`` (publishing); this core module
only reads them, so it finds that folder through the import system without importing the
package's code.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


def _shipped_root() -> Path:
    """The ``model_cards/`` folder, in a source checkout, an editable or a regular install."""
    spec = importlib.util.find_spec("ascl.model_cards")  # locates the package; runs none of its code
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(__file__).resolve().parents[1] / "model_cards"


SHIPPED_ROOT = _shipped_root()
HUB_ORG = "ascl-hub"


@dataclass(frozen=True)
class ShippedModel:
    """One registered model: its name, hub repo id and what it is."""

    name: str
    repo_id: str
    summary: str
    use: str = ""  # what it is for, in a few words (``ascl models`` shows it)

    def folder(self, root: Path | None = None) -> Path:
        """Where its shipped hub folder lives (it may be absent: see ``is_shipped``)."""
        return (root or SHIPPED_ROOT) / self.name

    def is_shipped(self, root: Path | None = None) -> bool:
        """True when the shipped folder holds a config and weights that can be loaded."""
        folder = self.folder(root)
        has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
        return (folder / "config.json").is_file() and has_weights


MODELS: dict[str, ShippedModel] = {
    m.name: m
    for m in (
        ShippedModel(
            name="ascl-resnet18w16-imagenette-cpu",
            repo_id=f"{HUB_ORG}/ascl-resnet18w16-imagenette-cpu",
            summary="ASCL ResNet-18 at base width 16 (ImageNet stem, 128x128) trained on Imagenette's photos "
            "without labels on a 2-core CPU; 128-d embeddings.",
            use="photos (objects and scenes, 128 px)",
        ),
        ShippedModel(
            name="ascl-resnet18w16-cifar10-cpu",
            repo_id=f"{HUB_ORG}/ascl-resnet18w16-cifar10-cpu",
            summary="ASCL ResNet-18 at base width 16 (CIFAR stem, 32x32) trained on CIFAR-10 without labels "
            "on a 2-core CPU; 128-d embeddings.",
            use="small thumbnails (CIFAR-like, 32 px)",
        ),
        ShippedModel(
            name="ascl-resnet18-cifar10",
            repo_id=f"{HUB_ORG}/ascl-resnet18-cifar10",
            summary="ASCL ResNet-18 (CIFAR stem, 32x32) pretrained on CIFAR-10 without labels; 512-d embeddings.",
            use="small thumbnails (CIFAR-like, 32 px)",
        ),
    )
}

# Users search photos: the photo model is the default; the CIFAR-10 models stay selectable by name
# for small thumbnails.
DEFAULT_MODEL = "ascl-resnet18w16-imagenette-cpu"
DEFAULT_ALIAS = "default"


def resolve_name(name: str) -> str:
    """``default`` -> the default model's name; any other name unchanged."""
    return DEFAULT_MODEL if name == DEFAULT_ALIAS else name


def lookup(name: str) -> ShippedModel | None:
    """The registered model called ``name`` (``default`` included), or None when not registered."""
    return MODELS.get(resolve_name(name))
