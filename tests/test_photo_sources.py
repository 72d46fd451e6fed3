"""Photos as an image source: the imagenette-offline archive and folders of mixed sizes and formats,
decoded once per size into a cache that must equal a fresh decode."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ascl import image_sources as S
from ascl.image_sources import ImageSourceNotFound, decoded_folder, iter_images, load_arrays, parse_spec
from ascl.images import decode_image
from ascl.training.data import load_split

IMAGENETTE_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette" / "train.tar.gz"
IMAGENETTE_CLASSES = ["cassette_player", "chain_saw", "church", "english_springer", "french_horn", "garbage_truck",
                      "gas_pump", "golf_ball", "parachute", "tench"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCL_CACHE", str(tmp_path / "cache"))


def _encode(pixels: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _mixed_folder(root: Path) -> Path:
    """Two labelled classes of photos in five formats and sizes, none of them square or 32 px."""
    rng = np.random.default_rng(0)
    files = {
        "cat/a.jpg": (_encode(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), "JPEG")),
        "cat/b.png": (_encode(rng.integers(0, 256, (200, 64, 3), dtype=np.uint8), "PNG")),
        "cat/c.webp": (_encode(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), "WEBP")),
        "dog/d.png": (_encode(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "PNG", "L")),  # greyscale
        "dog/e.png": (_encode(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), "PNG", "RGBA")),
        "dog/f.bmp": (_encode(rng.integers(0, 256, (33, 17, 3), dtype=np.uint8), "BMP")),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_folder_of_mixed_photos_decodes_once_and_the_cache_equals_a_fresh_decode(tmp_path: Path) -> None:
    folder = _mixed_folder(tmp_path / "photos")
    first = decoded_folder(folder, 48)
    fresh = np.stack([decode_image(item.read(), 48) for item in iter_images(folder)])
    assert first.images.shape == (6, 48, 48, 3) and first.images.dtype == np.uint8
    np.testing.assert_array_equal(first.images, fresh)
    assert first.classes == ["cat", "dog"] and first.labels.tolist() == [0, 0, 0, 1, 1, 1]
    cached = list((Path(os.environ["ASCL_CACHE"]) / S.DECODED_CACHE_FOLDER).iterdir())
    assert len(cached) == 1
    again = load_arrays(str(folder), 48)  # the image-source entry point reads the cache
    np.testing.assert_array_equal(again.images, fresh)
    assert len(list((Path(os.environ["ASCL_CACHE"]) / S.DECODED_CACHE_FOLDER).iterdir())) == 1


def test_a_replaced_photo_means_a_new_decode(tmp_path: Path) -> None:
    folder = _mixed_folder(tmp_path / "photos")
    before = decoded_folder(folder, 32)
    replacement = np.full((50, 50, 3), 200, dtype=np.uint8)
    (folder / "cat" / "a.jpg").write_bytes(_encode(replacement, "PNG"))
    os.utime(folder / "cat" / "a.jpg", ns=(1, 1))  # a different modification time, whatever the clock says
    after = decoded_folder(folder, 32)
    assert not np.array_equal(before.images[0], after.images[0])
    np.testing.assert_array_equal(after.images[0], decode_image((folder / "cat" / "a.jpg").read_bytes(), 32))
    np.testing.assert_array_equal(before.images[1:], after.images[1:])


def test_a_damaged_cache_entry_is_decoded_again(tmp_path: Path) -> None:
    folder = _mixed_folder(tmp_path / "photos")
    good = decoded_folder(folder, 24)
    entry = next((Path(os.environ["ASCL_CACHE"]) / S.DECODED_CACHE_FOLDER).iterdir())
    (entry / "images.npy").write_bytes(b"\x93NUMPY truncated")
    np.testing.assert_array_equal(decoded_folder(folder, 24).images, good.images)


def test_imagenette_offline_names_its_variable_when_the_archive_is_missing(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCL_IMAGENETTE_TAR", str(tmp_path / "nowhere.tar.gz"))
    with pytest.raises(ImageSourceNotFound, match="ASCL_IMAGENETTE_TAR"):
        parse_spec("imagenette-offline")
    with pytest.raises(ImageSourceNotFound, match="imagenette-offline:PATH"):
        parse_spec(f"imagenette-offline:{tmp_path / 'nowhere.tar.gz'}")
    monkeypatch.delenv("ASCL_IMAGENETTE_TAR")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(S, "CHECKOUT", tmp_path / "no-checkout")
    with pytest.raises(ImageSourceNotFound, match="ASCL_IMAGENETTE_TAR"):
        parse_spec("imagenette-offline")


def test_imagenette_offline_reads_an_archive_named_by_its_variable(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    tar_path = tmp_path / "train.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for label in ("tench", "church"):
            for i in range(10):
                data = _encode(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8), "JPEG")
                info = tarfile.TarInfo(f"imagenette/train/{label}/{i:03d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("ASCL_IMAGENETTE_TAR", str(tar_path))
    assert parse_spec("imagenette-offline").path == tar_path.resolve()
    train = load_split("imagenette-offline", "train", image_size=64)
    val = load_split("imagenette-offline", "val", image_size=64)
    assert train.classes == ["church", "tench"] and len(train) == 18 and len(val) == 2  # last 10% of each class
    assert sorted(val.labels.tolist()) == [0, 1]


@pytest.mark.slow
@pytest.mark.skipif(not IMAGENETTE_TAR.is_file(), reason=f"the Imagenette copy is not at {IMAGENETTE_TAR}")
def test_the_shipped_imagenette_copy_decodes_at_160_with_its_ten_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCL_IMAGENETTE_TAR", str(IMAGENETTE_TAR))
    full = load_arrays("imagenette-offline", 160)
    assert full.images.shape == (9469, 160, 160, 3) and full.classes == IMAGENETTE_CLASSES
    counts = np.bincount(full.labels, minlength=10)
    assert counts.min() >= 858 and counts.max() <= 993
    first_class = [item for item in iter_images(IMAGENETTE_TAR) if item.label == IMAGENETTE_CLASSES[0]]
    first = min(first_class, key=lambda it: it.path)  # the cache sorts by (label, member name)
    np.testing.assert_array_equal(full.images[0], decode_image(first.read(), 160))
    val = load_split("imagenette-offline", "val", image_size=160)
    assert len(val) == sum(int(np.ceil(c * 0.1)) for c in counts)
