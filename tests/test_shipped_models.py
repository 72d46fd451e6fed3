"""The shipped models are what their cards say: each one's kNN top-1 on its own validation split
(held out of the data it was trained on, which its card records) stays above a floor, and far
above the same architecture with random weights, measured in the same test.

``FLOORS`` has one row per shipped model; shipping a model without adding its row fails
``test_every_shipped_model_has_a_floor``. A row's floor sits below the model's own figure on the
subsets it names by several times their sampling noise, and far above what random weights get.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from ascl.encoder import Encoder
from ascl.models import resolve_model
from ascl.registry import DEFAULT_MODEL, MODELS
from ascl.training.data import load_split
from ascl.training.knn import KNN_K, KNN_T, embed_images, knn_accuracy


@dataclass(frozen=True)
class Floor:
    """What one shipped model must reach on its own val split: the card's protocol (kNN, k=200,
    t=0.1) on a seeded subset of the train split as the bank and of the val split as queries."""

    knn_top1: float  # the floor, a fraction
    above_random: float  # the least lead over random weights of the same architecture
    train_subset: int
    val_subset: int


FLOORS = {
    # card: 68.98% (45,000 bank images, 5,000 queries); here 0.60 with these subsets, random weights 0.21
    "ascl-resnet18w16-cifar10-cpu": Floor(knn_top1=0.50, above_random=0.25, train_subset=1000, val_subset=500),
    # card: 75.66% at k=200 (8,516 bank photos, 953 queries); here 0.674 with these subsets, random weights 0.176
    "ascl-resnet18w16-imagenette-cpu": Floor(knn_top1=0.55, above_random=0.35, train_subset=1000, val_subset=500),
}
SHIPPED = sorted(name for name, entry in MODELS.items() if entry.is_shipped())


def trained_on(name: str) -> tuple[str, float]:
    """(data spec, val fraction) of the run a shipped model came from, read from its card."""
    card = ModelCard.load(MODELS[name].folder() / "README.md")
    match = re.search(r"The resolved training configuration:\s*```yaml\n(.*?)```", card.text, re.S)
    assert match, f"the card of {name} does not record its training configuration"
    data = yaml.safe_load(match.group(1))["data"]
    return str(data["spec"]), float(data["val_fraction"])


def test_every_shipped_model_has_a_floor() -> None:
    assert DEFAULT_MODEL in SHIPPED
    assert [name for name in SHIPPED if name not in FLOORS] == [], "add a row to FLOORS for each shipped model"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_beats_its_floor_and_random_weights_on_its_val_split(name: str, cifar_tar: Path) -> None:
    floor = FLOORS[name]
    spec, val_fraction = trained_on(name)
    shipped = resolve_model(name).load_encoder()
    torch.manual_seed(0)
    random_weights = Encoder(**shipped.config()).eval()  # the same architecture and preprocessing
    # the card's protocol (ascl.training.evaluate.evaluate_knn), with the images decoded once for both
    bank, queries = (load_split(spec, split, image_size=shipped.image_size, val_fraction=val_fraction, subset=n)
                     for split, n in (("train", floor.train_subset), ("val", floor.val_subset)))
    assert (len(bank), len(queries)) == (floor.train_subset, floor.val_subset)

    def knn_top1(encoder: Encoder) -> float:
        x, q = (embed_images(encoder, torch.from_numpy(s.images), 256, torch.device("cpu")) for s in (bank, queries))
        return knn_accuracy(x, torch.from_numpy(bank.labels), q, torch.from_numpy(queries.labels), KNN_K, KNN_T)

    trained, baseline = knn_top1(shipped), knn_top1(random_weights)
    assert trained >= floor.knn_top1, (trained, floor)
    assert trained >= baseline + floor.above_random, (trained, baseline)
