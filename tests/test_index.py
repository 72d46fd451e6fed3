"""FAISS gallery index: ids, metadata, versions, factories, and `ascl index` on real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import export_random_encoder

from ascl.cli import main
from ascl.serving.collections.faiss_index import (
    FLAT_MAX,
    HNSW_MAX,
    GalleryIndex,
    IndexFileError,
    auto_factory,
    manifest_version,
    read_manifest,
)


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_random_encoder(tmp_path_factory.mktemp("model") / "encoder.onnx")


def test_auto_factory_thresholds() -> None:
    assert auto_factory(10, 512) == "Flat"
    assert auto_factory(FLAT_MAX - 1, 512) == "Flat"
    assert auto_factory(FLAT_MAX, 512) == "HNSW32"
    assert auto_factory(HNSW_MAX, 512).startswith("IVF")
    assert "PQ256x4fs" in auto_factory(1_000_000, 512)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF16,PQ8x4fs"])
def test_add_search_remove_save_load(tmp_path: Path, factory: str) -> None:
    vectors = unit(2000, 32)
    index = GalleryIndex.create(32, factory)
    ids = index.add(vectors, [{"path": f"{i}.png", "label": str(i % 3)} for i in range(2000)])
    assert ids.tolist() == list(range(2000))
    scores, found = index.search(vectors[:5], 3)
    assert found[:, 0].tolist() == [0, 1, 2, 3, 4]  # each vector finds itself first
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first

    assert index.remove([1, 3, 99999]) == 2
    assert index.ntotal == 1998 and 1 not in index.metadata
    _, found = index.search(vectors[[1, 3]], 5)
    assert 1 not in found and 3 not in found

    version = index.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx")
    assert loaded.version == version == manifest_version(tmp_path / "idx") == 1
    assert loaded.ntotal == 1998 and loaded.metadata[5]["path"] == "5.png"
    more = loaded.add(unit(3, 32, seed=7), [{"path": "new"}] * 3)
    assert more.tolist() == [2000, 2001, 2002]  # ids never reused
    assert loaded.save(tmp_path / "idx") == 2


def test_search_rejects_bad_k_and_clamps_large_k(tmp_path: Path) -> None:
    index = GalleryIndex.create(8, "Flat")
    index.add(unit(4, 8), [{}] * 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(unit(1, 8), 0)
    scores, ids = index.search(unit(2, 8), 5)  # k beyond the index: clamped, not an error
    assert scores.shape == ids.shape == (2, 4) and sorted(ids[0].tolist()) == [0, 1, 2, 3]
    empty = GalleryIndex.create(8, "Flat")
    assert empty.search(unit(1, 8), 3)[1].shape == (1, 0)
    with pytest.raises(ValueError, match=r"shape \[N, 8\]"):
        index.search(unit(1, 9), 1)


def test_new_version_keeps_previous_files_and_is_atomic(tmp_path: Path) -> None:
    index = GalleryIndex.create(8, "Flat")
    index.add(unit(4, 8), [{}] * 4)
    for _ in range(3):
        index.save(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["index.v2.faiss", "index.v3.faiss", "manifest.json", "metadata.v2.jsonl", "metadata.v3.jsonl"]
    assert read_manifest(tmp_path)["index"] == "index.v3.faiss"


def test_not_an_index_and_bad_factory(tmp_path: Path) -> None:
    with pytest.raises(IndexFileError, match="not an index folder"):
        GalleryIndex.load(tmp_path)
    with pytest.raises(IndexFileError, match="bad FAISS factory"):
        GalleryIndex.create(8, "NoSuchIndex42")


def test_cli_build_rerun_add_remove_info(onnx_model: Path, digits_folder: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "idx"
    assert main(["index", "build", "--model", str(onnx_model), "--images", str(digits_folder),
                 "--out", str(out), "--batch-size", "32"]) == 0
    manifest = read_manifest(out)
    assert manifest["count"] == 120 and manifest["factory"] == "Flat" and manifest["dim"] == 128
    records = [json.loads(line) for line in (out / manifest["metadata"]).read_text().splitlines()]
    assert {r["label"] for r in records} == {str(d) for d in range(10)}
    assert all(r["size"] > 0 and len(r["sha1"]) == 40 and not Path(r["path"]).is_absolute() for r in records)

    # Re-running on the same source embeds nothing new and writes no new version.
    assert main(["index", "build", "--model", str(onnx_model), "--images", str(digits_folder), "--out", str(out)]) == 0
    assert "added 0, skipped 120 already indexed" in capsys.readouterr().out
    assert manifest_version(out) == 1

    # `add` a list file of one new image (a flipped digit), with the model taken from the manifest.
    from PIL import Image

    Image.open(digits_folder / "0" / "0000.png").transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(tmp_path / "new.png")
    (tmp_path / "list.txt").write_text("new.png\n")
    assert main(["index", "add", "--index", str(out), "--images", str(tmp_path / "list.txt")]) == 0
    assert read_manifest(out)["count"] == 121 and manifest_version(out) == 2

    assert main(["index", "remove", "--index", str(out), "--paths", "new.png", "--ids", "0"]) == 0
    assert read_manifest(out)["count"] == 119
    capsys.readouterr()
    assert main(["index", "info", "--index", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ntotal"] == 119 and info["labels"]["0"] == 11


def test_cli_build_from_cifar_tar(onnx_model: Path, cifar_tar: Path, tmp_path: Path) -> None:
    out = tmp_path / "cifar"
    assert main(["index", "build", "--model", str(onnx_model), "--images", f"cifar10-offline:{cifar_tar}",
                 "--out", str(out), "--limit", "64", "--factory", "HNSW32"]) == 0
    index = GalleryIndex.load(out)
    assert index.ntotal == 64 and index.manifest["factory"] == "HNSW32"
    assert all(m["path"].startswith("train/") and m["label"] for m in index.metadata.values())


def test_cli_errors_are_clear(onnx_model: Path, digits_folder: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", "build", "--model", str(tmp_path / "missing.onnx"), "--images", str(digits_folder),
                 "--out", str(tmp_path / "x")]) == 2
    assert "missing.onnx: no such ONNX file" in capsys.readouterr().err
    assert main(["index", "build", "--model", str(onnx_model), "--images", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "no such folder or list file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing half-written
    assert main(["index", "info", "--index", str(tmp_path)]) == 2
    assert "not an index folder" in capsys.readouterr().err

    other = export_random_encoder(tmp_path / "other.onnx", seed=1)
    out = tmp_path / "idx"
    assert main(["index", "build", "--model", str(onnx_model), "--images", str(digits_folder / "1"), "--out", str(out)]) == 0
    assert main(["index", "build", "--model", str(other), "--images", str(digits_folder), "--out", str(out)]) == 2
    assert "built with another model" in capsys.readouterr().err


def test_add_image_bytes_dedups_and_versions(onnx_model: Path, digits_folder: Path, tmp_path: Path) -> None:
    from ascl.export.runtime import OnnxEmbedder
    from ascl.images import ImageError, decode_image
    from ascl.serving.collections.build import build_index
    from ascl.serving.online.gallery import add_image_bytes

    out = tmp_path / "idx"
    build_index(onnx_model, str(digits_folder / "2"), out, progress=False)
    data = (digits_folder / "5" / "0001.png").read_bytes()
    (new_id,) = add_image_bytes(out, onnx_model, [("mine.png", data)], label="5")
    assert new_id == 12 and manifest_version(out) == 2
    assert add_image_bytes(out, onnx_model, [("again.png", data)]) == [12]  # same bytes: same id
    assert manifest_version(out) == 2
    query = OnnxEmbedder(onnx_model).embed(decode_image(data, 32)[None])  # [1, 512]
    hit = GalleryIndex.load(out).hits(query, 1)[0][0]
    assert hit.id == 12 and hit.metadata["label"] == "5"
    with pytest.raises(ImageError, match="bad.png"):
        add_image_bytes(out, onnx_model, [("bad.png", b"not an image")])
    assert manifest_version(out) == 2


def test_index_benchmark_runs_tiny(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "index.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "index.py"), "--n", "3000", "--queries", "20",
                    "--cifar", "0", "--factories", "HNSW32", "--out", str(out)], check=True, capture_output=True)
    (synthetic,) = json.loads(out.read_text())["sets"]
    rows = {r["factory"]: r for r in synthetic["rows"]}
    assert synthetic["auto"] == "Flat" and rows["Flat (exact)"]["recall_at_10"] == 1.0
    assert 0.5 < rows["HNSW32"]["recall_at_10"] <= 1.0 and rows["HNSW32"]["qps_single"] > 0


def test_save_refuses_to_write_over_a_version_it_did_not_start_from(tmp_path: Path) -> None:
    from ascl.serving.collections.index import IndexConflictError

    index = GalleryIndex.create(8, "Flat")
    index.add(unit(4, 8), [{"path": f"{i}"} for i in range(4)])
    index.save(tmp_path / "idx")
    first, second = GalleryIndex.load(tmp_path / "idx"), GalleryIndex.load(tmp_path / "idx")
    first.remove([0])
    assert first.save(tmp_path / "idx") == 2
    second.add(unit(1, 8, seed=3), [{"path": "new"}])
    with pytest.raises(IndexConflictError, match="started from version 1"):
        second.save(tmp_path / "idx")
    final = GalleryIndex.load(tmp_path / "idx")
    assert final.version == 2 and 0 not in final.metadata and final.ntotal == 3  # the removal survived


def test_writer_lock_waits_for_the_holder_then_names_it(tmp_path: Path) -> None:
    import threading
    import time

    from ascl.serving.collections.faiss_index import IndexBusyError, writer_lock

    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with writer_lock(tmp_path, who="ascl index add"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    waits: list[str] = []
    with pytest.raises(IndexBusyError, match=r"ascl index add.*writing this index"), \
            writer_lock(tmp_path, timeout_s=0.3, on_wait=waits.append):
        pass
    assert waits and "waiting for pid" in waits[0]
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    with writer_lock(tmp_path, timeout_s=10):  # waits for the holder, then gets it
        assert time.monotonic() - started >= 0.2
    thread.join()


@pytest.mark.slow
def test_add_racing_remove_loses_neither(digits_folder: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``ascl index add`` embedding a large batch while ``ascl index remove`` finishes: the
    removed ids stay removed and every added image is there (the add applies its change to
    the version the removal wrote)."""
    import threading

    from PIL import Image

    from ascl.export.runtime import OnnxEmbedder
    from ascl.serving.collections.build import build_index, remove_from_index

    onnx_model = export_random_encoder(tmp_path / "full.onnx", width=64)  # full width: the add takes a while
    idx = tmp_path / "idx"
    build_index(onnx_model, str(digits_folder), idx, progress=False)
    embedding = threading.Event()
    real_embed = OnnxEmbedder.embed

    def embed_and_say(self: OnnxEmbedder, images: np.ndarray) -> np.ndarray:  # the real embed, observed
        embedding.set()
        return real_embed(self, images)

    monkeypatch.setattr(OnnxEmbedder, "embed", embed_and_say)
    more = tmp_path / "more"
    for n, src in enumerate(sorted(digits_folder.rglob("*.png")) * 2):
        out = more / src.parent.name / f"{n}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).rotate(90 if n < 120 else 270).save(out)  # 240 distinct new images
    errors: list[BaseException] = []

    def add() -> None:
        try:
            build_index(onnx_model, str(more), idx, progress=False)
        except BaseException as exc:
            errors.append(exc)

    adder = threading.Thread(target=add)
    adder.start()
    assert embedding.wait(60), "the add never started embedding"  # its first batch of 240 images is under way
    removed, _ = remove_from_index(idx, [0, 1, 2], [])
    assert adder.is_alive(), "the add finished before the removal: no race was tested"
    adder.join(120)
    assert errors == [] and removed == 3
    final = GalleryIndex.load(idx)
    assert {0, 1, 2}.isdisjoint(final.metadata)
    assert final.ntotal == 120 - 3 + 240
    assert {m["path"] for m in final.metadata.values()} >= {p.relative_to(more).as_posix() for p in more.rglob("*.png")}
