"""Pure parity metrics and image-set loading used by the export checks (no models)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ascl.export.image_sets import load_image_set, synthetic_image_set
from ascl.export.parity import compare, knn_top1, recall_at_k, row_cosine, top_k_neighbours


def _clusters(n_per: int = 12, classes: int = 4, dim: int = 16, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), n_per)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_row_cosine_and_neighbours() -> None:
    x, _ = _clusters()
    assert np.allclose(row_cosine(x, x), 1.0)
    assert np.allclose(row_cosine(x, -x), -1.0)
    nn = top_k_neighbours(x, 5)
    assert nn.shape == (len(x), 5)
    assert not (nn == np.arange(len(x))[:, None]).any()  # never itself


def test_recall_at_k_detects_changed_neighbours() -> None:
    x, _ = _clusters()
    assert recall_at_k(x, x) == 1.0
    assert recall_at_k(x, x * 2.0) == 1.0  # a scale does not change cosine ranks
    shuffled = x[np.random.default_rng(1).permutation(len(x))]
    assert recall_at_k(x, shuffled) < 0.5


def test_knn_top1_on_separable_and_random_labels() -> None:
    x, labels = _clusters()
    assert knn_top1(x, labels) == 1.0
    assert knn_top1(x, np.random.default_rng(0).permutation(labels)) < 0.7


def test_compare_fp32_and_int8_tolerances() -> None:
    x, labels = _clusters()
    images = np.zeros((len(x), 4, 4, 3), dtype=np.uint8)
    ok = compare(x, lambda b: x[: len(b)], images, precision="fp32", source="t", batch_sizes=[len(x)])
    assert ok.passed and ok.min_cosine > 0.9999 and ok.max_abs_error == 0.0
    noisy = (x + np.random.default_rng(2).normal(scale=0.3, size=x.shape)).astype(np.float32)
    bad = compare(x, lambda b: noisy[: len(b)], images, precision="fp32", source="t", batch_sizes=[len(x)])
    assert not bad.passed and "min cosine" in bad.problems[0]
    int8 = compare(x, lambda b: noisy[: len(b)], images, precision="int8", source="t", labels=labels,
                   batch_sizes=[len(x)], min_recall=0.999)
    assert int8.recall_at_10 is not None and int8.recall_at_10 < 0.999 and not int8.passed
    assert int8.knn_top1_reference == 1.0


def _png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_sets_from_folder_tar_and_errors(tmp_path: Path, digits_folder: Path) -> None:
    digits = load_image_set(digits_folder, 16, count=30)
    assert digits.images.shape == (30, 16, 16, 3) and digits.images.dtype == np.uint8
    assert digits.labels is not None and digits.classes == tuple(str(i) for i in range(10))
    rest = load_image_set(digits_folder, 16, count=30, offset=30)
    assert not any((a == b).all() for a in digits.images for b in rest.images[:5])  # disjoint offsets

    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i, (cls, color) in enumerate([("cat", (255, 0, 0)), ("dog", (0, 255, 0)), ("cat", (0, 0, 255))]):
            data = _png(color)
            info = tarfile.TarInfo(f"train/{cls}/{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    from_tar = load_image_set(archive, 8, count=10)
    assert len(from_tar) == 3 and from_tar.classes == ("cat", "dog")
    assert from_tar.labels is not None and from_tar.labels.tolist() == [0, 1, 0]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_image_set(empty, 8, count=4)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_image_set(tmp_path / "missing", 8, count=4)
    assert synthetic_image_set(8, 5).images.shape == (5, 8, 8, 3)
