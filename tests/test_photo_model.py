"""A photo model end to end, tiny: the photo recipe (ImageNet stem, crops of larger decoded photos,
OpenCV views) at 64 px trains, saves as a hub folder, exports to ONNX with its parity check and
is served by the real ``tritonserver``."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from PIL import Image, ImageDraw

from ascl.cli import main
from ascl.export.runtime import OnnxEmbedder
from ascl.images import list_images, load_image

SIZE = 64


def _photo(kind: str, seed: int) -> bytes:
    """A synthetic photo of one of two kinds (discs or stripes) on a coloured ground, of varying size."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(80, 120)), int(rng.integers(80, 120))
    image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    for _ in range(4):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(8, 20))
        if kind == "discs":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.rectangle((x - 2 * r, y - 3, x + 2 * r, y + 3), fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for kind in ("discs", "stripes"):
        (root / kind).mkdir()
        for i in range(24):
            (root / kind / f"{i:02d}.jpg").write_bytes(_photo(kind, seed=hash((kind, i)) % 10_000))
    return root


@pytest.fixture(scope="module")
def tiny_run(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("photo-run") / "run"
    sets = [f"data.image_size={SIZE}", "data.decode_size=80", "model.width=8", "model.bn_splits=2", "batch_size=16",
            "epochs=2", "moco.queue_size=64", "eval.knn_every=1", "eval.knn_k=5", "checkpoint_every=1",
            "optim.warmup_epochs=0.5", "log_every=1"]
    argv = ["train", "--config", "imagenette_cpu", "--data", str(photos), "--out", str(run), "--no-progress"]
    assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 0
    return run


def test_photo_recipe_trains_at_64_px_with_the_imagenet_stem(tiny_run: Path) -> None:
    import yaml

    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["model"]["stem"] == "imagenet" and config["data"]["image_size"] == SIZE
    assert config["data"]["decode_size"] == 80 and config["views"] == "auto"
    rows = (tiny_run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    knn = [r.split(",")[header.index("knn_top1")] for r in rows[1:]]
    assert sum(1 for v in knn if v) == 2  # the kNN monitor ran after each epoch
    losses = [float(r.split(",")[header.index("loss")]) for r in rows[1:] if r.split(",")[header.index("loss")]]
    assert losses and all(np.isfinite(losses))
    assert (tiny_run / "checkpoints" / "last.pt").is_file()


@pytest.fixture(scope="module")
def tiny_hub(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("photo-hub") / "hub"
    assert main(["push", str(tiny_run), "--repo-id", "tests/tiny-photo", "--dry-run", "--out", str(out), "--no-eval"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_onnx(tiny_hub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("photo-onnx")
    assert main(["export", "onnx", str(tiny_hub), "--out", str(out), "--verify-size", "16"]) == 0
    return out / "encoder.onnx"


def test_photo_model_saves_and_exports_with_parity(tiny_hub: Path, tiny_onnx: Path, photos: Path) -> None:
    from ascl.hub import load_encoder

    config = json.loads((tiny_hub / "config.json").read_text())
    assert (config["stem"], config["image_size"], config["width"]) == ("imagenet", SIZE, 8)
    assert "kNN top-1 (k=5, t=0.1)" in (tiny_hub / "README.md").read_text()  # the vote the monitor used
    export = json.loads((tiny_onnx.parent / "export.json").read_text())
    assert export["config"]["image_size"] == SIZE and export["config"]["stem"] == "imagenet"
    images = np.stack([load_image(p, SIZE) for p in list_images(photos)[:12]])  # the serving decode rule
    import torch

    want = load_encoder(str(tiny_hub)).embed_uint8(torch.from_numpy(images)).numpy()
    got = OnnxEmbedder(tiny_onnx).embed(images)
    assert got.shape == (12, 64) and float((got * want).sum(1).min()) > 0.9999


@pytest.fixture(scope="module")
def tiny_server(tiny_onnx: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ascl.serving import TritonServer
    from ascl.serving.collections.build import build_index
    from ascl.serving.online.repository import write_repository

    root = tmp_path_factory.mktemp("photo-served")
    build_index(tiny_onnx, str(photos), root / "idx", progress=False)
    repo = write_repository(root / "models", tiny_onnx, root / "idx")
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    try:
        server.start()
        yield server.grpc_url
    finally:
        server.stop()


@pytest.mark.triton
def test_photo_model_is_served_by_tritonserver(tiny_server: str, tiny_onnx: Path, photos: Path) -> None:
    from ascl.serving import Client

    files = list_images(photos)
    with Client(tiny_server) as client:
        remote = client.embed(files[:8])
        hits = client.search(files[:4], k=3)
    local = OnnxEmbedder(tiny_onnx).embed(np.stack([load_image(f, SIZE) for f in files[:8]]))
    np.testing.assert_allclose(remote, local, atol=1e-5)
    for query, found in zip(files[:4], hits, strict=True):  # every photo finds itself first
        assert found[0].metadata["path"].endswith(query.name) and found[0].score == pytest.approx(1.0, abs=1e-4)
