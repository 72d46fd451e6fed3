"""Golden embeddings: stored input images and the embeddings a given model must produce.

One folder per model key under ``tests/golden/``: ``images/NN.png`` (uint8, at the model's size,
lossless), ``embeddings.npy`` (float32 [N, D], eager PyTorch fp32) and ``golden.json`` (how to
rebuild the model, versions). PyTorch, ONNX Runtime and TensorRT are all checked against the same
file, so a regression anywhere in the chain shows up as a number. Regenerate with
``ascl export golden`` (deterministic initialisation) or ``ascl export golden --model M``
(a trained model, e.g. the default one once it exists).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ascl.atomic import atomic_dir
from ascl.images import list_images, load_image

if TYPE_CHECKING:
    from ascl.encoder import Encoder

INIT_SEED = 0
INIT_CONFIG: dict[str, Any] = {"arch": "resnet18", "stem": "cifar", "image_size": 32}
INIT_KEY = "init-seed0-resnet18-cifar-32"
GOLDEN_IMAGES = 8


@dataclass
class GoldenSet:
    key: str
    images: np.ndarray  # [N, S, S, 3] uint8
    embeddings: np.ndarray  # [N, D] float32
    info: dict[str, Any]


def init_encoder(seed: int = INIT_SEED, config: dict[str, Any] | None = None) -> Encoder:
    """A deterministically initialised encoder (CPU RNG: identical on every machine for a torch version)."""
    import torch

    from ascl.encoder import Encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder(**(config or INIT_CONFIG))
    return encoder.eval()


def model_key(spec: str) -> str:
    """A folder-safe key for a model spec (registered name, repo id or path)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec).name if Path(spec).exists() else spec).strip("-") or "model"


def write_golden(encoder: Encoder, images: np.ndarray, root: str | Path, *, key: str, source: dict[str, Any]) -> Path:
    """Store ``images`` [N, S, S, 3] and ``encoder``'s eager embeddings under ``root/key`` (atomically)."""
    import torch
    from PIL import Image

    from ascl.export.pipeline import reference_embeddings

    embeddings = reference_embeddings(encoder, images)  # [N, D]
    info = {
        "key": key,
        "model": source,
        "config": encoder.config(),
        "images": int(len(images)),
        "embedding_dim": int(embeddings.shape[1]),
        "torch": torch.__version__,
        "tolerance": {"min_cosine": 0.9999},
    }
    folder = Path(root) / key
    with atomic_dir(folder) as tmp:
        (tmp / "images").mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp / "images" / f"{i:02d}.png", optimize=True)
        buf = io.BytesIO()
        np.save(buf, embeddings.astype(np.float32))
        (tmp / "embeddings.npy").write_bytes(buf.getvalue())
        (tmp / "golden.json").write_text(json.dumps(info, indent=2) + "\n")
    folder.chmod(0o755)  # atomic_dir's temporary folder is private
    return folder


def read_golden(folder: str | Path) -> GoldenSet:
    """Load a golden folder written by ``write_golden``."""
    folder = Path(folder)
    info = json.loads((folder / "golden.json").read_text())
    size = int(info["config"]["image_size"])
    images = np.stack([load_image(p, size) for p in list_images(folder / "images")])  # [N, S, S, 3]
    embeddings = np.load(folder / "embeddings.npy", allow_pickle=False)  # [N, D]
    if len(images) != len(embeddings):
        raise ValueError(f"{folder}: {len(images)} images but {len(embeddings)} embeddings")
    return GoldenSet(str(info["key"]), images, embeddings, info)


def golden_encoder(golden: GoldenSet) -> Encoder:
    """Rebuild the model a golden set was made with."""
    model = golden.info["model"]
    if model["kind"] == "init":
        return init_encoder(int(model["seed"]), golden.info["config"])
    from ascl.export.model_source import load_model

    return load_model(str(model["spec"]), revision=model.get("revision")).encoder
