"""Datasets, splits, augmentation and the reference two-view loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ascl.images import ImageError
from ascl.training.augment import AugmentConfig, blur_kernel_size, view_transform
from ascl.training.data import DataError, holdout_mask, load_split, load_uint8
from ascl.training.loaders import EpochBatchSampler, ReferenceTwoViewLoader


def test_digits_split_is_per_class_and_disjoint() -> None:
    train = load_split("digits", "train", image_size=16)
    val = load_split("digits", "val", image_size=16)
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
    assert len(train) + len(val) == 1797
    counts = np.bincount(val.labels, minlength=10)
    assert (counts >= 17).all() and (counts <= 19).all()  # ceil(10% of ~180) per class


def test_load_uint8_types(digits_folder: Path) -> None:
    images, labels = load_uint8(str(digits_folder), "train", image_size=24)
    assert images.dtype == torch.uint8 and images.shape[1:] == (24, 24, 3)
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    val_images, val_labels = load_uint8(str(digits_folder), "val", image_size=24)
    assert len(val_labels) == 20 and len(images) == 100  # last 2 of 12 per class held out


def test_unlabelled_folder_gets_minus_one(tmp_path: Path, digits_folder: Path) -> None:
    for i, png in enumerate(sorted(digits_folder.rglob("*.png"))[:10]):
        shutil.copy(png, tmp_path / f"{i}.png")
    data = load_split(str(tmp_path), "train", image_size=16, val_fraction=0.2)
    assert len(data) == 8 and (data.labels == -1).all()


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=str(tmp_path)):
        load_split(str(tmp_path), "train")


def test_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        load_split(str(tmp_path / "nope"), "train")


def test_corrupt_image_names_the_file(tmp_path: Path, digits_folder: Path) -> None:
    shutil.copytree(digits_folder, tmp_path / "d")
    bad = tmp_path / "d" / "3" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageError, match="broken.png"):
        load_split(str(tmp_path / "d"), "train")


def test_holdout_mask_keeps_one_train_image_per_class() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    mask = holdout_mask(labels, 0.5)
    assert mask.tolist() == [False, False, True, True, False, True, False]


@pytest.mark.slow
def test_offline_cifar_val_is_last_500_per_class(cifar_tar: Path) -> None:
    """Decoded once into the (session's) cache, which every CIFAR-10 user of the suite then reads."""
    from ascl.cache import cache_dir

    val = load_split(f"cifar10-offline:{cifar_tar}", "val", image_size=32)
    assert val.images.shape == (5000, 32, 32, 3)
    assert np.bincount(val.labels).tolist() == [500] * 10
    assert val.classes[0] == "airplane"
    cached = load_split(f"cifar10-offline:{cifar_tar}", "train", image_size=32, subset=100)  # read back from the cache
    assert len(cached) == 100 and any(p.is_file() for p in (cache_dir() / "cifar10-offline").glob("*/images.npy"))


def test_blur_kernel_is_odd_and_about_a_tenth() -> None:
    assert blur_kernel_size(32) == 3 and blur_kernel_size(96) == 11 and blur_kernel_size(224) == 23
    assert all(blur_kernel_size(s) % 2 == 1 and blur_kernel_size(s) >= 3 for s in range(8, 300))


def test_views_shapes_and_weak_view_keeps_colours() -> None:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    cfg = AugmentConfig()
    for view in ("strong", "weak"):
        out = view_transform(view, cfg, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(img)
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="key_view"):
        AugmentConfig(key_view="medium")


def test_reference_loader_is_deterministic_and_resumable() -> None:
    images = load_split("digits", "train", image_size=8).images[:40]
    kw = {"seed": 3, "num_workers": 0}
    a = ReferenceTwoViewLoader(images, 8, 8, (0.5,) * 3, (0.5,) * 3, AugmentConfig(), **kw)  # type: ignore[arg-type]
    a.set_epoch(1)
    full = list(a)
    a.set_epoch(1, start_batch=3)
    tail = list(a)
    assert len(full) == 5 and len(tail) == 2
    torch.testing.assert_close(tail[0][0], full[3][0])
    torch.testing.assert_close(tail[1][1], full[4][1])
    a.set_epoch(2)
    assert not torch.equal(next(iter(a))[0], full[0][0])


def test_sampler_shards_ranks_disjointly() -> None:
    shards = []
    for rank in range(2):
        s = EpochBatchSampler(20, 4, seed=0, rank=rank, world_size=2)
        s.set_epoch(0)
        shards.append({i for batch in s for _, i in batch})
    assert len(shards[0] & shards[1]) == 0 and len(shards[0]) == 8
