"""The demo's search functions without any UI: real ONNX Runtime, real FAISS, real images."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_helpers import huge_png, png_bytes

from ascl.demo import search as actions
from ascl.demo.gallery_images import cifar_subset_from_tar, digits_gallery, folder_key, resolve_gallery
from ascl.images import MAX_IMAGE_BYTES
from ascl.serving.online.gallery import InProcessGallery, build_index
from ascl.serving.online.serve import choose_model, ensure_onnx


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


NOT_SHIPPED = "ascl-resnet18-cifar10"  # registered, weights not shipped: the fallbacks apply


@pytest.fixture(scope="module")
def onnx_path(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded random encoder's export: what ``ascl up`` falls back to when no default is shipped."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ascl.registry.DEFAULT_MODEL", NOT_SHIPPED)
        choice = choose_model(None, runs_dir=tmp_path_factory.mktemp("no-runs"))
    path, exported = ensure_onnx(choice, demo_cache)
    assert exported
    return path


@pytest.fixture()
def no_shipped_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ascl.registry.DEFAULT_MODEL", NOT_SHIPPED)


def test_the_shipped_default_comes_first(tmp_path: Path) -> None:
    from ascl.registry import DEFAULT_MODEL, lookup

    for name in (DEFAULT_MODEL, "default"):
        entry = lookup(name)
        assert entry is not None and entry.is_shipped(), f"{DEFAULT_MODEL} is not shipped in model_cards/"
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"  # a local run does not displace the default
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    for spec in (None, "default"):
        choice = choose_model(spec, runs_dir=tmp_path)
        assert choice.warning is None and DEFAULT_MODEL in choice.description, choice
        assert choice.spec == str(lookup(DEFAULT_MODEL).folder())  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def digits_index(onnx_path: Path, digits_folder: Path, demo_cache: Path) -> Path:
    index_dir = demo_cache / "digits-index"
    assert build_index(onnx_path, digits_folder, index_dir) == 120
    return index_dir


@pytest.fixture()
def backend(onnx_path: Path, digits_index: Path, tmp_path: Path) -> InProcessGallery:
    """A fresh copy of the index per test, so additions do not leak between tests."""
    shutil.copytree(digits_index, tmp_path / "index")
    return InProcessGallery(onnx_path, tmp_path / "index")


@pytest.mark.usefixtures("no_shipped_default")
def test_random_fallback_is_loud_and_export_is_cached(onnx_path: Path, demo_cache: Path, tmp_path: Path) -> None:
    choice = choose_model(None, runs_dir=tmp_path)
    assert choice.spec is None and choice.warning and "RANDOMLY" in choice.description
    again, exported = ensure_onnx(choice, demo_cache)
    assert again == onnx_path and not exported


@pytest.mark.usefixtures("no_shipped_default")
def test_newest_run_is_chosen_and_keyed_by_content(tmp_path: Path) -> None:
    for name, payload in (("old", b"a"), ("new", b"b")):
        ckpt = tmp_path / name / "checkpoints" / "last.pt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(payload)
    choice = choose_model(None, runs_dir=tmp_path)
    assert choice.spec == str(tmp_path / "new" / "checkpoints" / "last.pt")
    assert choice.warning and "newest local training run" in choice.warning
    (tmp_path / "new" / "checkpoints" / "last.pt").write_bytes(b"c")
    assert choose_model(None, runs_dir=tmp_path).key != choice.key


@pytest.mark.usefixtures("no_shipped_default")
def test_newest_run_is_exported_with_its_trained_weights(tmp_path: Path) -> None:
    import torch

    from ascl.encoder import Encoder
    from ascl.export.runtime import OnnxEmbedder
    from ascl.training.checkpoint import ENCODER_PREFIX, save_checkpoint

    torch.manual_seed(3)
    encoder = Encoder(image_size=16).eval()
    state = {f"{ENCODER_PREFIX}{k}": v for k, v in encoder.state_dict().items()}
    save_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt",
                    {"encoder_config": encoder.config(), "model": state})
    choice = choose_model(None, runs_dir=tmp_path / "runs")
    onnx_path, exported = ensure_onnx(choice, tmp_path / "cache")
    assert exported and choice.key.startswith("run-")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    expected = encoder.embed_uint8(torch.from_numpy(pixels)).numpy()  # [3, 512]
    np.testing.assert_allclose(OnnxEmbedder(onnx_path).embed(pixels), expected, atol=1e-4)


def test_search_ranks_k_results_and_finds_the_query_first(backend: InProcessGallery, digits_folder: Path,
                                                          tmp_path: Path) -> None:
    query = sorted(digits_folder.rglob("*.png"))[30]
    outcome = actions.search(backend, query.read_bytes(), 7)
    scores = [r.score for r in outcome.results]
    assert len(scores) == 7 and scores == sorted(scores, reverse=True)
    assert outcome.results[0].file == query and outcome.results[0].score == pytest.approx(1.0, abs=1e-4)
    assert outcome.results[0].label == query.parent.name and outcome.seconds > 0
    assert actions.caption(outcome.results[0]).startswith("1.000 · ")
    thumb = Path(actions.thumbnail(outcome.results[0], tmp_path))
    width, height = Image.open(query).size  # a 32-px digit, shown enlarged to a side a person can see
    assert thumb.parent == tmp_path and Image.open(thumb).size == (128 * width // max(width, height),
                                                                   128 * height // max(width, height))
    assert actions.thumbnail(outcome.results[0], tmp_path) == str(thumb)  # reused, not rewritten


def test_added_image_is_found_first_at_once(backend: InProcessGallery) -> None:
    new = png_bytes(7)
    before = backend.count()
    added = actions.add(backend, new, "noise.png", "noise")
    assert backend.count() == before + 1
    top = actions.search(backend, new, 3).results[0]
    assert (top.id, top.label) == (added.id, "noise") and top.file is not None and top.file.read_bytes() == new
    fresh = InProcessGallery(backend.embedder.path, backend.index_dir)  # the addition is on disk too
    assert actions.search(fresh, new, 1).results[0].id == added.id
    again = actions.add(backend, new, "same-bytes-again.png", "other label")
    assert again.id == added.id and backend.count() == before + 1  # same content: one id


def test_labels_are_bounded_and_cleaned(backend: InProcessGallery) -> None:
    from ascl.serving.online.gallery import MAX_LABEL_CHARS, clean_label

    assert clean_label("  a\n cat\t") == "a cat" and clean_label("   ") is None
    with pytest.raises(actions.UserError, match=f"at most {MAX_LABEL_CHARS} characters"):
        actions.add(backend, png_bytes(8), "long.png", "x" * (MAX_LABEL_CHARS + 1))
    with pytest.raises(ValueError, match="printable"):
        clean_label("bell\x07")


def test_bad_inputs_become_friendly_errors(backend: InProcessGallery, tmp_path: Path) -> None:
    with pytest.raises(actions.UserError, match="not an image we can read"):
        actions.search(backend, b"this is text", 5, "notes.txt")
    with pytest.raises(actions.UserError, match="between 1 and"):
        actions.search(backend, png_bytes(1), 0)
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\0" * (MAX_IMAGE_BYTES + 1))
    with pytest.raises(actions.UserError, match="over the 20 MiB limit"):
        actions.upload_bytes({"path": str(huge), "orig_name": "huge.png"})
    with pytest.raises(actions.UserError, match="No image yet"):
        actions.upload_bytes(None)
    with pytest.raises(actions.UserError, match="pixel limit"):
        actions.search(backend, huge_png(), 3, "huge.png")
    assert len(actions.search(backend, png_bytes(2), 3).results) == 3  # still usable


def test_server_down_is_a_friendly_error() -> None:
    from conftest import free_port

    from ascl.serving.online.gallery import TritonGallery

    backend = TritonGallery(f"127.0.0.1:{free_port()}")
    with pytest.raises(actions.UserError, match="search server is not answering"):
        actions.search(backend, png_bytes(4), 5)
    with pytest.raises(actions.UserError, match="--index"):
        actions.add(backend, png_bytes(4), "x.png")


def test_upload_payloads(tmp_path: Path) -> None:
    data = png_bytes(3)
    file = tmp_path / "x.png"
    file.write_bytes(data)
    assert actions.upload_bytes({"path": str(file), "orig_name": "mine.png"}) == (data, "mine.png")
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert actions.upload_bytes({"url": url, "path": None})[0] == data
    assert actions.upload_bytes(str(file)) == (data, "x.png")
    percent = "data:image/png," + "".join(f"%{b:02x}" for b in data)
    assert actions.upload_bytes({"url": percent, "path": None})[0] == data


def test_oversized_data_urls_and_links_are_refused_before_anything_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue: the add path base64-decoded a data: URL of any size (400 MiB) before the size check."""
    decoded: list[int] = []
    real = base64.b64decode
    monkeypatch.setattr(base64, "b64decode", lambda text, **kw: decoded.append(len(text)) or real(text, **kw))
    over = "data:image/png;base64," + "A" * ((MAX_IMAGE_BYTES // 3 + 1) * 4)
    with pytest.raises(actions.UserError, match="over the 20 MiB limit"):
        actions.upload_bytes({"url": over, "path": None})
    with pytest.raises(actions.UserError, match="over the 20 MiB limit"):
        actions.upload_bytes({"url": "data:image/png," + "%00" * (MAX_IMAGE_BYTES + 10), "path": None})
    assert decoded == []
    with pytest.raises(actions.UserError, match="not fetched"):
        actions.upload_bytes({"url": "http://example.com/cat.png", "path": None})


def test_the_add_quota_counts_per_visitor_and_per_run() -> None:
    from ascl.demo.page_limits import AddQuota, QuotaError

    now = [0.0]
    quota = AddQuota(per_client=2, total=3, window_s=60, clock=lambda: now[0])
    quota.take("a")
    quota.take("a")
    with pytest.raises(QuotaError, match="limit per visitor"):
        quota.take("a")
    quota.take("b")  # another visitor has their own
    with pytest.raises(QuotaError, match="limit of 3 images"):
        quota.take("c")  # but all together: 3
    quota.give_back("b")  # an add that failed does not count
    quota.take("c")
    now[0] = 61.0  # the window slid past a's adds, the run's total stays
    with pytest.raises(QuotaError, match="limit of 3"):
        quota.take("a")
    with pytest.raises(QuotaError, match="switched off"):
        AddQuota(total=0).take("a")


def test_galleries(tmp_path: Path, digits_folder: Path, cifar_tar: Path) -> None:
    subset = cifar_subset_from_tar(cifar_tar, tmp_path, per_class=2)
    files = sorted(subset.root.rglob("*.jpg"))
    assert len(files) == 20 and {f.parent.name for f in files} >= {"cat", "truck"}
    no_photos = tmp_path / "no-imagenette.tar.gz"
    thumbnails = resolve_gallery(None, tmp_path, subset=20, cifar_tar=cifar_tar, photo_tar=no_photos)
    assert thumbnails.root == subset.root  # no photo copy: CIFAR-10, and the screen says why
    assert thumbnails.note and "no Imagenette photo copy" in thumbnails.note and "32-px thumbnails" in thumbnails.note
    photos = _photo_tar(tmp_path / "photos.tar.gz")
    chosen = resolve_gallery(None, tmp_path, subset=30, cifar_tar=cifar_tar, photo_tar=photos)
    assert chosen.note is None and chosen.description.startswith("Imagenette photos (160 px), a subset of 6")
    assert sorted(f.parent.name for f in chosen.root.rglob("*.jpg")) == ["church"] * 3 + ["tench"] * 3
    (tmp_path / "torchvision").write_text("a file where torchvision wants its folder: the download fails at once")
    fallback = resolve_gallery(None, tmp_path, cifar_tar=tmp_path / "absent.tar.gz", photo_tar=no_photos)
    assert fallback.note and "using scikit-learn's digits instead" in fallback.note
    assert len(list(fallback.root.rglob("*.png"))) == 1797
    assert fallback.root == digits_gallery(tmp_path).root
    assert resolve_gallery(str(digits_folder), tmp_path).key == f"dir-{folder_key(digits_folder)}"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_gallery(str(tmp_path / "missing"), tmp_path)


def _photo_tar(path: Path) -> Path:
    """A small archive in the Imagenette copy's layout: imagenette/train/<class>/<n>.jpg, 4 per class."""
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(path, "w:gz") as tar:
        for label in ("tench", "church"):
            for i in range(4):
                buf = io.BytesIO()
                Image.new("RGB", (160, 160), (40 * i, 90, 200)).save(buf, format="JPEG")
                info = tarfile.TarInfo(f"imagenette/train/{label}/{i:03d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return path


def test_demo_command_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ascl.cli import main

    assert main(["demo", "--in-process", "--cache", str(tmp_path)]) == 2
    assert "--in-process needs --index" in capsys.readouterr().err
    assert main(["demo", "--index", str(tmp_path), "--cache", str(tmp_path)]) == 2
    assert "not an index folder" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_command_serves_in_process_and_stops_on_sigterm(onnx_path: Path, digits_index: Path,
                                                             tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import free_port

    shutil.copytree(digits_index, tmp_path / "index")
    port = free_port()
    args = [sys.executable, "-m", "ascl", "demo", "--in-process", "--model", str(onnx_path), "--index",
            str(tmp_path / "index"), "--port", str(port)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                    assert page.status == 200 and "ascl image search" in page.read().decode()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "ascl demo did not start"
                time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stdout is not None and "stopping" in process.stdout.read()
