"""Encoders of any base width: keys, config and loading, and the whole chain at width 16.

Width 64 is torchvision's ResNet (keys, shapes and initialisation unchanged, so folders written
before widths existed still load); width 16 goes through save/load, ONNX export with its parity
check, int8, the FAISS index, the in-process demo backend and the real ``tritonserver``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import free_port

from ascl.cli import main
from ascl.encoder import Encoder
from ascl.export.runtime import OnnxEmbedder
from ascl.hub import load_encoder
from ascl.images import list_images, load_image
from ascl.model_cards.publish import save_encoder

WIDTH = 16


def run_export(*argv: str) -> int:
    return main(["export", *argv])


def test_width_64_is_torchvisions_resnet18() -> None:
    encoder = Encoder()
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = torch.nn.Identity()
    ours = {k: tuple(v.shape) for k, v in encoder.backbone.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    theirs["conv1.weight"] = (64, 3, 3, 3)  # the CIFAR stem
    assert ours == theirs
    assert encoder.embedding_dim == 512 and encoder.config()["width"] == 64


@pytest.mark.parametrize(("arch", "width", "dim"), [("resnet18", 16, 128), ("resnet34", 32, 256), ("resnet50", 8, 256)])
def test_width_scales_every_stage_and_keeps_the_keys(arch: str, width: int, dim: int) -> None:
    narrow, full = Encoder(arch=arch, width=width, image_size=16), Encoder(arch=arch, image_size=16)
    assert narrow.embedding_dim == dim
    assert list(narrow.state_dict()) == list(full.state_dict())
    assert narrow.backbone.layer1[0].conv1.out_channels == width
    assert narrow.backbone.layer4[0].conv1.out_channels == 8 * width
    out = narrow(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    convs = [m for m in narrow.backbone.modules() if isinstance(m, torch.nn.Conv2d)][1:]  # after the stem
    for conv in convs:  # torchvision's rule: Kaiming-normal, fan_out (std sqrt(2 / fan_out))
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        if conv.weight.numel() >= 1000:
            assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.15)


@pytest.mark.parametrize("bad", [0, 3, 300, 16.0, True])
def test_bad_width_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match="width must be an integer"):
        Encoder(width=bad)  # type: ignore[arg-type]


def test_a_folder_written_before_widths_existed_still_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = Encoder(image_size=16).eval()
    folder = save_encoder(encoder, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["width"]  # what a folder of an earlier version holds
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_encoder(folder)
    assert loaded.width == 64
    x = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    torch.testing.assert_close(loaded.embed_uint8(x), encoder.embed_uint8(x))


@pytest.fixture(scope="module")
def narrow_hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Encoder]:
    torch.manual_seed(3)
    encoder = Encoder(width=WIDTH, image_size=32).eval()
    return save_encoder(encoder, tmp_path_factory.mktemp("narrow") / "hub", max_shard_size="500KB"), encoder


def test_width_16_hub_round_trip(narrow_hub: tuple[Path, Encoder]) -> None:
    folder, encoder = narrow_hub
    assert json.loads((folder / "config.json").read_text())["width"] == WIDTH
    assert len(list(folder.glob("model-*.safetensors"))) >= 2  # sharded
    loaded = Encoder.from_pretrained(str(folder))
    assert (loaded.width, loaded.embedding_dim) == (WIDTH, 8 * WIDTH)
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    torch.testing.assert_close(loaded.embed_uint8(x), encoder.embed_uint8(x))


@pytest.fixture(scope="module")
def narrow_onnx(narrow_hub: tuple[Path, Encoder], digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("narrow-onnx")
    rc = run_export("onnx", str(narrow_hub[0]), "--out", str(out), "--int8", "--calibration", str(digits_folder),
                    "--verify-size", "60", "--calibration-size", "60", "--batch-sizes", "1", "64",
                    "--min-recall", "0.5")
    assert rc == 0
    return out


def test_width_16_export_parity_and_int8(narrow_onnx: Path, narrow_hub: tuple[Path, Encoder], digits_folder: Path) -> None:
    assert {"encoder.onnx", "encoder_int8.onnx", "export.json"} <= {p.name for p in narrow_onnx.iterdir()}
    images = np.stack([load_image(p, 32) for p in list_images(digits_folder)[:20]])
    fp32 = OnnxEmbedder(narrow_onnx / "encoder.onnx")
    assert fp32.embedding_dim == 8 * WIDTH
    got = fp32.embed(images)
    want = narrow_hub[1].embed_uint8(torch.from_numpy(images)).numpy()
    cosine = (got * want).sum(1)
    assert got.shape == (20, 128) and cosine.min() > 0.9999
    int8 = OnnxEmbedder(narrow_onnx / "encoder_int8.onnx").embed(images)
    assert int8.shape == (20, 128) and (int8 * got).sum(1).mean() > 0.95


def test_width_16_index_and_in_process_search(narrow_onnx: Path, digits_folder: Path, tmp_path: Path) -> None:
    from ascl.serving.collections.build import build_index
    from ascl.serving.online.gallery import InProcessGallery

    build_index(narrow_onnx / "encoder.onnx", str(digits_folder), tmp_path / "idx", progress=False)
    backend = InProcessGallery(narrow_onnx / "encoder.onnx", tmp_path / "idx")
    assert backend.index.dim == 128
    query = list_images(digits_folder)[5]
    hits = backend.search(query.read_bytes(), 5)
    assert len(hits) == 5 and hits[0].score == pytest.approx(1.0, abs=1e-4)


@pytest.fixture(scope="module")
def narrow_server(narrow_onnx: Path, digits_folder: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(gRPC address, index folder) of a tritonserver serving the width-16 export over the digits."""
    from ascl.serving import TritonServer
    from ascl.serving.collections.build import build_index
    from ascl.serving.online.repository import write_repository

    root = tmp_path_factory.mktemp("narrow-served")
    build_index(narrow_onnx / "encoder.onnx", str(digits_folder), root / "idx", progress=False)
    repo = write_repository(root / "models", narrow_onnx / "encoder.onnx", root / "idx")
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    try:
        server.start()
        yield server.grpc_url, root / "idx"
    finally:
        server.stop()


@pytest.mark.triton
def test_width_16_served_by_tritonserver(narrow_server: tuple[str, Path], narrow_onnx: Path,
                                         digits_folder: Path) -> None:
    from ascl.serving import Client
    from ascl.serving.online.gallery import InProcessGallery

    url, index = narrow_server
    files = list_images(digits_folder)
    with Client(url) as client:
        remote = client.embed(files[:10])
        results = client.search(files, k=6)
    local = OnnxEmbedder(narrow_onnx / "encoder.onnx").embed(np.stack([load_image(f, 32) for f in files[:10]]))
    assert remote.shape == (10, 128)
    np.testing.assert_allclose(remote, local, atol=1e-5)
    # the served search is the in-process one over the same index: the same ids, the same scores
    local_hits = InProcessGallery(narrow_onnx / "encoder.onnx", index).search([f.read_bytes() for f in files], 6)
    assert [[h.id for h in hits] for hits in results] == [[r.id for r in row] for row in local_hits]
    np.testing.assert_allclose([[h.score for h in hits] for hits in results],
                               [[r.score for r in row] for row in local_hits], atol=1e-4)
    assert all(hits[0].metadata["path"] == f.relative_to(digits_folder).as_posix() for f, hits in zip(files, results,
                                                                                                       strict=True))
