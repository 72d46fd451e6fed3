"""The one image-source grammar (ascl.image_sources) and its four users: training, calibration,
indexing and the demo gallery, which must read the same images as their own readers did before."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ascl import image_sources as S
from ascl.errors import AsclError
from ascl.image_sources import (
    ImageSourceError,
    ImageSourceNotFound,
    default_cifar_tar,
    describe_specs,
    iter_images,
    load_arrays,
    parse_spec,
    per_class_subset,
    render_digits,
    require_cifar_tar,
    resize_all,
)
from ascl.images import decode_image


def _png(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, layout: dict[str, int]) -> Path:
    """root/<label>/<i>.png with random pixels (not square, so decoding crops and resizes)."""
    seed = 0
    for label, count in layout.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / label / f"{i:02d}.png").write_bytes(_png(seed))
            seed += 1
    return root


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------- the grammar


def test_each_kind_of_spec(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "pics", {"cat": 1})
    listing = tmp_path / "list.txt"
    listing.write_text("pics/cat/00.png\n")
    archive = _tar(tmp_path / "set.tar.gz", [("train/cat/0.png", _png(1))])
    assert parse_spec(str(folder)).kind == "folder" and parse_spec(folder).path == folder
    assert parse_spec(str(listing)).kind == "list"
    assert parse_spec(str(archive)).kind == "tar"
    assert parse_spec(f"cifar10-offline:{archive}").path == archive
    for name in ("cifar10", "cifar100", "stl10"):
        assert parse_spec(name) == S.ImageSpec("torchvision", name, name=name)
    assert parse_spec("digits").kind == "digits"
    with pytest.raises(ImageSourceNotFound):  # a Path is a path, never a set name
        parse_spec(Path("digits"))
    text = describe_specs()
    for word in ("folder", "one image path per line", ".tar.gz", "cifar10-offline[:PATH]", "ASCL_CIFAR10_TAR",
                 "cifar10", "cifar100", "stl10", "digits"):
        assert word in text


def test_bad_specs_raise_one_error_class(tmp_path: Path) -> None:
    image = tmp_path / "one.png"
    image.write_bytes(_png(0))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    listing = tmp_path / "list.txt"
    listing.write_text("# one missing\nmissing.png\n")
    cases = [(str(tmp_path / "nope"), ImageSourceNotFound, "no such folder or list file"),
             ("  ", ImageSourceError, "empty image source"),
             ("cifar10-offline:", ImageSourceNotFound, "cifar10-offline:PATH"),
             (f"cifar10-offline:{tmp_path / 'x.tar.gz'}", ImageSourceNotFound, "no such file"),
             (str(image), ImageSourceError, "one image"),
             (str(binary), ImageSourceError, "not a text file"),
             (str(listing), ImageSourceNotFound, "missing.png")]
    for spec, kind, words in cases:
        with pytest.raises(kind, match=words) as caught:
            list(iter_images(spec))
        assert isinstance(caught.value, AsclError) and caught.value.exit_code == 2
        assert isinstance(caught.value, ValueError)  # what export and training callers catch
    assert issubclass(ImageSourceNotFound, FileNotFoundError)  # what serving and the demo catch
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceNotFound, match="no images found"):
        iter_images(str(tmp_path / "empty"))  # checked at the call, not at the first next()
    bad_tar = tmp_path / "bad.tar.gz"
    bad_tar.write_bytes(b"not a tar")
    with pytest.raises(ImageSourceError, match="not a readable tar"):
        list(iter_images(str(bad_tar)))
    with pytest.raises(ImageSourceError, match="not a torchvision set"):
        S.load_torchvision("mnist")


def test_default_tar_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def tar_at(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _tar(path, [("train/cat/0.png", _png(0))])

    checkout = tmp_path / "a" / "checkout"
    checkout.mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    beside = tar_at(tmp_path / "a" / S.SHARED_CIFAR_TAR)
    work = tmp_path / "b" / "work"
    work.mkdir(parents=True)
    in_cwd = tar_at(tmp_path / "b" / S.SHARED_CIFAR_TAR)
    env = tar_at(tmp_path / "env" / "mine.tar.gz")
    monkeypatch.setattr(S, "CHECKOUT", checkout)
    monkeypatch.chdir(work)

    monkeypatch.setenv("ASCL_CIFAR10_TAR", str(env))
    assert default_cifar_tar() == env.resolve() and parse_spec("cifar10-offline").path == env.resolve()
    monkeypatch.setenv("ASCL_CIFAR10_TAR", str(tmp_path / "gone.tar.gz"))
    with pytest.raises(ImageSourceNotFound, match="ASCL_CIFAR10_TAR"):  # a wrong setting is reported
        default_cifar_tar()
    monkeypatch.delenv("ASCL_CIFAR10_TAR")
    assert default_cifar_tar() == beside.resolve()  # beside the source checkout
    (checkout / "pyproject.toml").unlink()  # not a checkout (an installed package)
    assert default_cifar_tar() == in_cwd.resolve()  # ../shared/... from the working folder
    in_cwd.unlink()
    assert default_cifar_tar() is None
    with pytest.raises(ImageSourceNotFound, match=r"set \$ASCL_CIFAR10_TAR.*cifar10-offline:PATH"):
        require_cifar_tar()
    with pytest.raises(ImageSourceNotFound, match="ASCL_CIFAR10_TAR"):
        parse_spec("cifar10-offline")


# ----------------------------------------------------------------------------- records


def test_folder_labels_order_and_limit(tmp_path: Path) -> None:
    root = _folder(tmp_path / "pics", {"dog": 2, "cat": 2})
    (root / "cat" / "deeper").mkdir()
    (root / "cat" / "deeper" / "x.png").write_bytes(_png(9))
    (root / "notes.txt").write_text("not an image")
    items = list(iter_images(str(root)))
    assert [i.path for i in items] == ["cat/00.png", "cat/01.png", "cat/deeper/x.png", "dog/00.png", "dog/01.png"]
    assert [i.label for i in items] == ["cat", "cat", "cat", "dog", "dog"]  # first-level folder names the class
    assert {i.source for i in items} == {str(root.resolve())}
    assert items[2].read() == (root / "cat" / "deeper" / "x.png").read_bytes()
    assert [i.path for i in iter_images(str(root), limit=2)] == ["cat/00.png", "cat/01.png"]
    assert [i.path for i in iter_images(str(root))] == [i.path for i in items]  # stable
    (root / "top.png").write_bytes(_png(10))
    mixed = load_arrays(str(root), 8)
    assert mixed.images.shape == (6, 8, 8, 3) and (mixed.labels == -1).all() and mixed.classes == []
    flat = load_arrays(str(tmp_path / "pics" / "dog"), 8)  # images at its top level: unlabelled
    assert (flat.labels == -1).all()


def test_list_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "pics", {"cat": 2})
    listing = tmp_path / "lists" / "l.txt"
    listing.parent.mkdir()
    absolute = root / "cat" / "01.png"
    listing.write_text(f"# a comment\n\n../pics/cat/00.png\n{absolute}\n")
    items = list(iter_images(str(listing)))
    assert [i.path for i in items] == ["../pics/cat/00.png", str(absolute)]
    assert [i.label for i in items] == [None, None] and items[1].file == absolute
    assert items[0].read() == (root / "cat" / "00.png").read_bytes()
    assert items[0].source == str(listing.resolve())


def test_archive_order_decoded_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCL_CACHE", str(tmp_path / "cache"))
    members = [("train/dog/1.png", _png(1)), ("train/cat/1.png", _png(2)), ("train/dog/0.png", _png(3)),
               ("train/cat/0.png", _png(4)), ("train/readme.txt", b"text")]
    archive = _tar(tmp_path / "set.tar.gz", members)
    items = list(iter_images(f"cifar10-offline:{archive}"))
    assert [i.path for i in items] == [m for m, _ in members[:4]]  # archive order, as a stream
    assert [i.read() for i in items] == [d for _, d in members[:4]]
    assert items[0].source == f"cifar10-offline:{archive.resolve()}" and items[0].label == "dog"
    arrays = load_arrays(str(archive), 32)
    assert arrays.classes == ["cat", "dog"] and arrays.labels.tolist() == [0, 0, 1, 1]  # by (label, name)
    expected = [decode_image(d, 32) for _, d in sorted(members[:4])]
    np.testing.assert_array_equal(arrays.images, np.stack(expected))
    assert len(list((tmp_path / "cache" / S.DECODED_CACHE_FOLDER).rglob("images.npy"))) == 1
    monkeypatch.setattr(S, "decode_all", lambda *a, **k: pytest.fail("decoded again instead of read from the cache"))
    again = load_arrays(str(archive), 32)
    np.testing.assert_array_equal(again.images, arrays.images)
    assert again.classes == arrays.classes


def test_digits_rendered_once_and_read_as_pngs() -> None:
    digits = render_digits(16)
    assert digits.images.shape == (1797, 16, 16, 3) and digits.images.dtype == np.uint8
    assert digits.classes == [str(i) for i in range(10)] and render_digits(16) is digits  # cached
    items = list(iter_images("digits", limit=30, render_size=16))
    assert items[0].path == f"{digits.labels[0]}/0000.png" and items[0].source == "digits"
    for i, item in enumerate(items):
        np.testing.assert_array_equal(item.decode(16), digits.images[i])
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(item.read()))), digits.images[i])
    subset = per_class_subset(iter_images("digits", render_size=16), 2)
    assert len(subset) == 20 and [s.path for s in subset[:2]] == ["0/0000.png", "0/0001.png"]


def test_torchvision_offline_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "torchvision").write_text("a file where torchvision wants its folder: fails at once")
    with pytest.raises(ImageSourceError, match="Offline.*cifar10-offline"):
        S.load_torchvision("cifar10", root=tmp_path / "torchvision")


# ----------------------------------------------------------------------------- the four users, as before


def _old_training_folder(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """training/data.py's load_folder before the core module: sorted files, labels if all in class folders."""
    from ascl.images import list_images, load_image

    paths = list_images(folder)
    rel = [p.relative_to(folder) for p in paths]
    classes = sorted({r.parts[0] for r in rel})
    labels = np.array([classes.index(r.parts[0]) for r in rel], dtype=np.int64)
    return np.stack([load_image(p, size) for p in paths]), labels


def _old_calibration_folder(folder: Path, size: int, count: int, offset: int, seed: int = 0) -> np.ndarray:
    """export/image_sets.py's _from_folder before: seeded shuffle per class, round-robin over classes."""
    from ascl.images import list_images, load_image

    groups: dict[str, list[Path]] = {}
    for path in list_images(folder):
        groups.setdefault(path.relative_to(folder).parts[0], []).append(path)
    for members in groups.values():
        random.Random(seed).shuffle(members)
    ordered = [groups[k] for k in sorted(groups)]
    flat = [g[i] for i in range(max(len(g) for g in ordered)) for g in ordered if i < len(g)]
    return np.stack([load_image(p, size) for p in flat[offset : offset + count]])


def test_training_calibration_indexing_and_demo_read_the_same_images(tmp_path: Path) -> None:
    from ascl.demo.gallery_images import folder_key, resolve_gallery
    from ascl.export.image_sets import load_image_set
    from ascl.image_sources import iter_images as iter_source  # what the index builder reads
    from ascl.training.data import holdout_mask, load_split

    root = _folder(tmp_path / "pics", {"b": 5, "a": 4, "c": 3})
    old_images, old_labels = _old_training_folder(root, 16)
    mask = holdout_mask(old_labels, 0.25)
    train = load_split(str(root), "train", image_size=16, val_fraction=0.25)
    val = load_split(str(root), "val", image_size=16, val_fraction=0.25)
    np.testing.assert_array_equal(train.images, old_images[~mask])
    np.testing.assert_array_equal(val.images, old_images[mask])
    assert val.labels.tolist() == old_labels[mask].tolist() and train.classes == ["a", "b", "c"]

    for offset, count in ((0, 5), (5, 6)):
        sample = load_image_set(root, 16, count=count, offset=offset)
        np.testing.assert_array_equal(sample.images, _old_calibration_folder(root, 16, count, offset))
        assert sample.source == str(root) and sample.classes == ("a", "b", "c")

    records = list(iter_source(str(root), limit=7))
    files = sorted(p for p in root.rglob("*.png"))[:7]
    assert [r.path for r in records] == [f.relative_to(root).as_posix() for f in files]
    assert [r.read() for r in records] == [f.read_bytes() for f in files]
    assert [r.label for r in records] == [f.parent.name for f in files]

    gallery = resolve_gallery(str(root), tmp_path / "cache")
    assert gallery.root == root.resolve() and gallery.key == f"dir-{folder_key(root.resolve())}"
    assert gallery.description == f"12 images from {root.resolve()}"


def test_demo_digits_gallery_as_before(tmp_path: Path) -> None:
    """Same pixels as the demo's own renderer drew (8x8 grey, bilinear, RGB PNG), one PNG per digit."""
    from sklearn.datasets import load_digits

    from ascl.demo.gallery_images import digits_gallery

    gallery = digits_gallery(tmp_path)
    files = sorted(gallery.root.rglob("*.png"))
    assert len(files) == 1797 and gallery.key == "sklearn-digits-32"
    digits = load_digits()
    by_label: dict[str, list[np.ndarray]] = {}
    for pixels, label in zip(digits.images, digits.target, strict=True):
        gray = (pixels / 16.0 * 255).astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((32, 32), Image.Resampling.BILINEAR).convert("RGB")
        by_label.setdefault(str(int(label)), []).append(np.asarray(image))
    for label in ("0", "7"):
        written = [np.asarray(Image.open(f)) for f in sorted((gallery.root / label).glob("*.png"))]
        assert len(written) == len(by_label[label])
        np.testing.assert_array_equal(np.stack(written), np.stack(by_label[label]))


def test_small_archive_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training (decoded at 32, then resized), calibration (first per class in archive order, sorted,
    round-robin) and the demo subset (numbers below per_class) of a crafted CIFAR-like archive."""
    from ascl.demo.gallery_images import cifar_subset_from_tar
    from ascl.export.image_sets import load_image_set
    from ascl.training.data import load_split

    monkeypatch.setenv("ASCL_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    members = [(f"train/{c}/{n:04d}.png", _png(10 * k + n, (32, 32))) for k, c in enumerate(("ship", "cat"))
               for n in range(6)]
    rng.shuffle(members)
    archive = _tar(tmp_path / "train.tar.gz", members)
    in_order = sorted(members, key=lambda m: (m[0].split("/")[1], m[0]))

    val = load_split(f"cifar10-offline:{archive}", "val", image_size=24, val_fraction=0.3)
    old = [decode_image(d, 32) for _, d in in_order]
    old_val = [im for i, im in enumerate(old) if i % 6 >= 4]  # last ceil(0.3 * 6) = 2 of each class
    np.testing.assert_array_equal(val.images, resize_all(np.stack(old_val), 24))
    assert val.classes == ["cat", "ship"] and val.labels.tolist() == [0, 0, 1, 1]

    sample = load_image_set(archive, 32, count=4, offset=2)
    firsts: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in members:  # archive order, at most offset + count per class, then by name
        group = firsts.setdefault(name.split("/")[1], [])
        if len(group) < 6:
            group.append((name, data))
    ordered = [sorted(firsts[c]) for c in sorted(firsts)]
    flat = [g[i] for i in range(6) for g in ordered]
    np.testing.assert_array_equal(sample.images, np.stack([decode_image(d, 32) for _, d in flat[2:6]]))

    gallery = cifar_subset_from_tar(archive, tmp_path / "demo", per_class=3)
    written = {f.relative_to(gallery.root).as_posix(): f.read_bytes() for f in gallery.root.rglob("*.png")}
    expected = {f"{n.split('/')[1]}/{n.split('/')[2]}": d for n, d in members if int(n[-8:-4]) < 3}
    assert written == expected


@pytest.mark.slow
def test_real_cifar_tar_demo_subset_as_before(cifar_tar: Path, tmp_path: Path) -> None:
    """The demo's CIFAR-10 subset: exactly the members the old regex rule picked (number < per_class)."""
    import re

    from ascl.demo.gallery_images import cifar_subset_from_tar

    rule = re.compile(r"^(?:\./)?train/([a-z]+)/(\d+)\.(jpg|jpeg|png)$")
    expected = {}
    with tarfile.open(cifar_tar, "r:gz") as tar:
        for member in tar:
            match = rule.match(member.name)
            if member.isfile() and match and int(match.group(2)) < 2:
                data = tar.extractfile(member)
                assert data is not None
                expected[f"{match.group(1)}/{int(match.group(2)):04d}.{match.group(3)}"] = data.read()
    gallery = cifar_subset_from_tar(cifar_tar, tmp_path, per_class=2)
    written = {f.relative_to(gallery.root).as_posix(): f.read_bytes() for f in gallery.root.rglob("*.jpg")}
    assert written == expected and len(written) == 20


def test_help_texts_are_the_one_grammar() -> None:
    from ascl.cli import build_parser

    text = describe_specs()
    parser = build_parser()
    commands: Any = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]

    def help_of(*path: str, option: str) -> str:
        p = commands[path[0]]
        for name in path[1:]:
            p = p._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]
        return next(a.help for a in p._actions if option in a.option_strings) or ""

    assert text in help_of("index", "build", option="--images")
    assert text in help_of("export", "onnx", option="--images")
    assert text in help_of("export", "onnx", option="--calibration")
