"""Golden embeddings: stored images must embed to the stored vectors in PyTorch, ONNX Runtime and TensorRT.

Regenerate a set with ``ascl export golden [--model M]`` (see ascl.export.golden).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ascl.export.golden import GoldenSet, golden_encoder, read_golden
from ascl.export.onnx_export import export_onnx
from ascl.export.parity import row_cosine
from ascl.export.pipeline import reference_embeddings
from ascl.export.runtime import OnnxEmbedder
from ascl.export.tensorrt_build import tensorrt_skip_reason

GOLDEN_ROOT = Path(__file__).parent / "golden"
FOLDERS = sorted(p for p in GOLDEN_ROOT.iterdir() if (p / "golden.json").is_file())


@pytest.fixture(scope="module", params=FOLDERS, ids=[p.name for p in FOLDERS])
def golden(request: pytest.FixtureRequest) -> GoldenSet:
    return read_golden(request.param)


@pytest.fixture(scope="module")
def golden_onnx(golden: GoldenSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(golden_encoder(golden), tmp_path_factory.mktemp("golden") / "encoder.onnx")


def _assert_matches(out: np.ndarray, golden: GoldenSet, min_cosine: float) -> None:
    assert out.shape == golden.embeddings.shape
    assert row_cosine(out, golden.embeddings).min() >= min_cosine


def test_golden_sets_are_small_and_complete() -> None:
    assert FOLDERS, "no golden sets under tests/golden (run 'ascl export golden')"
    total = sum(f.stat().st_size for f in GOLDEN_ROOT.rglob("*") if f.is_file())
    assert total < 512 * 1024


def test_pytorch_matches_golden(golden: GoldenSet) -> None:
    _assert_matches(reference_embeddings(golden_encoder(golden), golden.images), golden, 0.9999)


def test_onnxruntime_matches_golden(golden: GoldenSet, golden_onnx: Path) -> None:
    embedder = OnnxEmbedder(golden_onnx, providers=["CPUExecutionProvider"])
    _assert_matches(embedder.embed(golden.images), golden, 0.9999)
    _assert_matches(np.concatenate([embedder.embed(golden.images[i : i + 1]) for i in range(len(golden.images))]),
                    golden, 0.9999)


@pytest.mark.gpu
@pytest.mark.skipif(tensorrt_skip_reason() is not None, reason=str(tensorrt_skip_reason()))
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_tensorrt_matches_golden(golden: GoldenSet, golden_onnx: Path, tmp_path: Path, fp16: bool) -> None:
    from ascl.export.tensorrt_build import TensorRTEmbedder, build_engine

    plan = build_engine(golden_onnx, tmp_path / "encoder.plan", min_batch=1, opt_batch=8, max_batch=16, fp16=fp16,
                        workspace_gib=1.0)
    _assert_matches(TensorRTEmbedder(plan).embed(golden.images), golden, 0.999 if fp16 else 0.9999)


@pytest.mark.triton
def test_served_embeddings_match_golden(golden: GoldenSet, golden_onnx: Path, tmp_path: Path) -> None:
    """The served path (``ascl serve``'s service: PNG bytes in, the fused embed model, the front door)
    gives the stored vectors: decoding, resizing and the graph agree with the reference."""
    from conftest import free_port

    from ascl.serving import Client
    from ascl.serving.collections.build import build_index
    from ascl.serving.online.repository import write_repository
    from ascl.serving.online.service import SearchService

    folder = GOLDEN_ROOT / golden.key / "images"
    build_index(golden_onnx, str(folder), tmp_path / "idx", progress=False)
    repo = write_repository(tmp_path / "models", golden_onnx, tmp_path / "idx")
    with SearchService(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as service:
        images = [p.read_bytes() for p in sorted(folder.glob("*.png"))]
        with Client(service.grpc_url) as client:
            _assert_matches(client.embed(images), golden, 0.9999)
            (hits,) = client.search(images[:1], k=1)
        assert hits[0].metadata["path"] == "00.png" and hits[0].score > 0.9999  # itself, found through the index
