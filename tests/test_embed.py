"""`ascl embed`: Parquet embedding sets (round trip, resume after a kill, errors), `index build
--from-parquet`, the model-mismatch refusals of every entry point, and the Ray engine against the
local one on a local Ray instance."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from serving_helpers import export_random_encoder

from ascl.cli import main
from ascl.images import list_images, load_image
from ascl.serving.collections.parquet_set import embeddings_of, read_errors, read_manifest, read_table

ROOT = Path(__file__).resolve().parents[1]


def _hub_model(root: Path, name: str, seed: int) -> tuple[Path, Any]:
    import torch

    from ascl.encoder import Encoder

    torch.manual_seed(seed)
    encoder = Encoder(width=16, image_size=32).eval()
    encoder.save_pretrained(root / name)
    return root / name, encoder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two small random encoders as hub folders (model-a, model-b: 128-d), exported once into the session's
    cache (which the CLI calls in this process and the subprocesses share)."""
    from ascl.export.cache import cached_onnx
    from ascl.models import resolve_model

    root = tmp_path_factory.mktemp("models")
    out: dict[str, Any] = {}
    for key, seed in (("a", 0), ("b", 1)):
        folder, encoder = _hub_model(root, f"model-{key}", seed)
        ref = resolve_model(str(folder))
        out[key] = {"folder": folder, "encoder": encoder, "ref": ref, "onnx": cached_onnx(ref)[0]}
    return out


def _embed(*args: str) -> int:
    return main(["embed", *args, "--no-progress"])


def _rows(out: Path) -> dict[str, Any]:
    table = read_table(out)
    return {**{c: table.column(c).to_pylist() for c in table.column_names if c != "embedding"},
            "embedding": embeddings_of(table)}


def test_parquet_round_trip_equals_the_encoder(models: dict[str, Any], digits_folder: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    a = models["a"]
    out = tmp_path / "set"
    # a first run stops at --limit 70; the second goes on from there: ids stay positions in the source
    assert _embed(str(digits_folder), "--model", str(a["folder"]), "--out", str(out), "--limit", "70",
                  "--max-rows-per-file", "50", "--batch-size", "32") == 0
    assert read_manifest(out)["count"] == 70
    assert _embed(str(digits_folder), "--model", str(a["folder"]), "--out", str(out),
                  "--max-rows-per-file", "50", "--batch-size", "32") == 0
    manifest = read_manifest(out)
    files = sorted(list_images(digits_folder))
    assert manifest["count"] == len(files) == 120 and manifest["errors"] == 0 and manifest["complete"]
    assert [(p["file"], p["first_id"], p["end_id"], p["rows"]) for p in manifest["parts"]] == [
        ("part-000000.parquet", 0, 50, 50), ("part-000001.parquet", 50, 70, 20), ("part-000002.parquet", 70, 120, 50)]
    model = manifest["model"]
    assert model["weights"] == f"sha256:{a['ref'].content_key}" == model["revision"]
    assert (model["name"], model["kind"], model["dim"], model["precision"]) == ("model-a", "hub_folder", 128, "fp32")
    assert manifest["dim"] == 128 and manifest["source"]["kind"] == "folder"
    assert manifest["schema"] == {"id": "int64", "path": "string", "label": "string", "sha1": "string",
                                  "size": "int64", "width": "int32", "height": "int32",
                                  "embedding": "fixed_size_list<item: float>[128]"}
    assert "created" in manifest and "updated" in manifest

    part = pq.read_table(out / "part-000000.parquet")
    assert part.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    rows = _rows(out)
    assert rows["id"] == list(range(120))
    assert rows["path"] == [f.relative_to(digits_folder).as_posix() for f in files]
    assert rows["label"] == [f.parent.name for f in files]
    assert rows["sha1"] == [hashlib.sha1(f.read_bytes()).hexdigest() for f in files]
    assert rows["size"] == [f.stat().st_size for f in files]
    assert set(rows["width"]) == set(rows["height"]) == {32}
    got = rows["embedding"]
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    pixels = np.stack([load_image(f, 32) for f in files])
    with torch.inference_mode():
        want = a["encoder"].embed_uint8(torch.from_numpy(pixels)).numpy()
    assert (got * want).sum(1).min() >= 0.9999

    # the same command again writes nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    capsys.readouterr()
    assert _embed(str(digits_folder), "--model", str(a["folder"]), "--out", str(out),
                  "--max-rows-per-file", "50") == 0
    assert "this run added 0 " in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == stamps


@pytest.mark.slow
def test_resume_after_a_kill_loses_and_duplicates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second writer is refused while the first runs; SIGKILL after the first part is committed; the
    re-run equals an uninterrupted run."""
    from ascl.serving.collections.embed import embed_collection

    onnx = export_random_encoder(tmp_path / "full.onnx", width=64)  # full-width ResNet-18: slow enough to be caught
    args = ["digits", "--model", str(onnx), "--limit", "300", "--max-rows-per-file", "40", "--batch-size", "20"]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ascl", "embed", *args, "--out", str(out), "--no-progress",
                             "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if read_manifest(out)["parts"]:
                    break
            except Exception:  # not written yet, or being replaced right now
                pass
            time.sleep(0.01)
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()[0].decode()[-2000:]}"
        # a second writer on the same set, while the first one runs: refused at once, naming the first
        assert main(["embed", *args, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"pid {proc.pid} (ascl embed)" in err and "is writing this embedding set" in err, err
        assert proc.poll() is None  # refused while the first still runs: it did not wait for the lock
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed = read_manifest(out)
    assert 1 <= len(killed["parts"]) < 8 and not killed["complete"]
    assert killed["count"] == sum(p["rows"] for p in killed["parts"]) == killed["next_id"]
    kept = {p["file"]: (out / p["file"]).stat().st_mtime_ns for p in killed["parts"]}

    assert main(["embed", *args, "--out", str(out), "--no-progress"]) == 0
    reference = tmp_path / "reference"
    embed_collection("digits", reference, model=str(onnx), limit=300, rows_per_file=40, batch_size=20, progress=False)
    resumed, whole = read_manifest(out), read_manifest(reference)
    assert resumed["complete"] and resumed["count"] == whole["count"] == 300
    strip = ("bytes", "precision")
    assert [{k: v for k, v in p.items() if k not in strip} for p in resumed["parts"]] == \
        [{k: v for k, v in p.items() if k not in strip} for p in whole["parts"]]
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept  # finished parts were not written again
    got, want = _rows(out), _rows(reference)
    assert got["id"] == list(range(300)) == want["id"]
    for column in ("path", "label", "sha1", "size", "width", "height"):
        assert got[column] == want[column]
    np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-5)
    assert not list(out.glob(".*.tmp"))


def _small_source(root: Path, digits_folder: Path, per_class: int = 3) -> Path:
    """A folder of ``per_class`` digits of each class (30 images), to embed and then change."""
    folder = root / "source"
    for label in sorted(p.name for p in digits_folder.iterdir()):
        (folder / label).mkdir(parents=True)
        for f in sorted((digits_folder / label).iterdir())[:per_class]:
            shutil.copy(f, folder / label / f.name)
    return folder


def _snapshot(out: Path) -> dict[str, int]:
    """Every data file of a set (parts, errors) by modification time: not the manifest, which a refused
    run rewrites with a new time stamp, nor the writer lock, which every run takes."""
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name not in ("_manifest.json", ".writer.lock")}


@pytest.fixture()
def half_embedded(models: dict[str, Any], digits_folder: Path, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """(source, set, arguments): 20 of the source's 30 images embedded in two parts of 10."""
    source = _small_source(tmp_path, digits_folder)
    out = tmp_path / "set"
    args = ["--model", str(models["a"]["onnx"]), "--out", str(out), "--max-rows-per-file", "10", "--batch-size", "8"]
    assert _embed(str(source), *args, "--limit", "20") == 0
    manifest = read_manifest(out)
    assert manifest["count"] == 20 and len(manifest["parts"]) == 2
    return source, out, args


def test_resume_refuses_a_source_that_changed_under_the_set(half_embedded: tuple[Path, Path, list[str]],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    source, out, args = half_embedded
    before, parts = _snapshot(out), read_manifest(out)["parts"]
    last = parts[-1]["last_path"]  # position 19
    (source / "0" / sorted(p.name for p in (source / "0").iterdir())[0]).unlink()  # every later position moves
    capsys.readouterr()
    assert _embed(str(source), *args) == 2
    err = capsys.readouterr().err
    assert "the source changed since this set was written" in err and f"position 19 was {last!r}" in err
    assert "embed it into a new --out" in err and "Traceback" not in err
    assert _snapshot(out) == before and read_manifest(out)["parts"] == parts  # nothing written, nothing lost


def test_resume_refuses_a_source_that_shrank_below_the_set(half_embedded: tuple[Path, Path, list[str]],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    source, out, args = half_embedded
    before, parts = _snapshot(out), read_manifest(out)["parts"]
    for label in ("6", "7", "8", "9"):
        shutil.rmtree(source / label)  # 18 images left of the 20 positions the set holds
    capsys.readouterr()
    assert _embed(str(source), *args) == 2
    err = capsys.readouterr().err
    assert "the source now has 18 images but the set holds 20 positions" in err and "Traceback" not in err
    assert _snapshot(out) == before and read_manifest(out)["parts"] == parts


def test_a_corrupt_manifest_or_part_file_is_a_clear_error(half_embedded: tuple[Path, Path, list[str]],
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ascl.serving.collections.parquet_set import EmbeddingSetError

    source, out, args = half_embedded
    manifest_text = (out / "_manifest.json").read_text()
    part = out / "part-000000.parquet"
    part_bytes = part.read_bytes()

    # a manifest cut short (a disk filled up, an editor): refused by every reader, the parts kept
    (out / "_manifest.json").write_text(manifest_text[: len(manifest_text) // 2])
    before = _snapshot(out)
    capsys.readouterr()
    assert _embed(str(source), *args) == 2
    assert "_manifest.json: unreadable manifest" in capsys.readouterr().err
    assert main(["index", "build", "--from-parquet", str(out), "--out", str(tmp_path / "idx")]) == 2
    assert "unreadable manifest" in capsys.readouterr().err and not (tmp_path / "idx").exists()
    assert _snapshot(out) == before and (out / "_manifest.json").read_text() == manifest_text[: len(manifest_text) // 2]
    (out / "_manifest.json").write_text(manifest_text.replace('"format_version": 1', '"format_version": 7'))
    with pytest.raises(EmbeddingSetError, match="not an ascl-embedding-set v1 manifest"):
        read_manifest(out)
    (out / "_manifest.json").write_text(manifest_text)

    # a part file cut short, or one with other rows than the manifest lists: named, never half read
    part.write_bytes(part_bytes[: len(part_bytes) // 2])
    with pytest.raises(EmbeddingSetError, match="part-000000.parquet: unreadable part file"):
        read_table(out)
    assert main(["index", "build", "--from-parquet", str(out), "--out", str(tmp_path / "idx")]) == 2
    assert "part-000000.parquet: unreadable part file" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()
    pq.write_table(pq.read_table(out / "part-000001.parquet").slice(0, 4), part)
    with pytest.raises(EmbeddingSetError, match="4 rows, the manifest says 10"):
        read_table(out)
    part.write_bytes(part_bytes)
    assert read_table(out).num_rows == 20  # put back: the set reads again


def _folder_with_bad_files(root: Path, digits_folder: Path) -> Path:
    folder = root / "mixed"
    for label in ("0", "1"):
        (folder / label).mkdir(parents=True)
        for f in sorted((digits_folder / label).iterdir())[:5]:
            shutil.copy(f, folder / label / f.name)
    (folder / "0" / "0002b.png").write_bytes(b"this is not an image")
    (folder / "1" / "0000a.jpg").write_bytes(b"")
    good = (digits_folder / "1" / "0001.png").read_bytes()
    (folder / "1" / "0003b.png").write_bytes(good[: len(good) // 2])  # truncated
    return folder


def test_unreadable_files_land_in_errors_parquet(models: dict[str, Any], digits_folder: Path, tmp_path: Path) -> None:
    folder = _folder_with_bad_files(tmp_path, digits_folder)
    out = tmp_path / "set"
    assert _embed(str(folder), "--model", str(models["a"]["onnx"]), "--out", str(out),
                  "--max-rows-per-file", "4", "--batch-size", "3") == 0
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["count"] == 10 and manifest["errors"] == 3
    errors = read_errors(out)
    paths = [f.relative_to(folder).as_posix() for f in list_images(folder)]
    assert [e["path"] for e in errors] == ["0/0002b.png", "1/0000a.jpg", "1/0003b.png"]
    assert [e["id"] for e in errors] == [paths.index(e["path"]) for e in errors]
    assert "empty input" in errors[1]["error"] and "not a readable image" in errors[0]["error"]
    rows = _rows(out)
    assert sorted(rows["id"] + [e["id"] for e in errors]) == list(range(13))
    assert pq.read_table(out / "errors.parquet").schema.names == ["id", "path", "error"]


def test_index_from_parquet_searches_like_the_image_index(models: dict[str, Any], digits_folder: Path,
                                                          tmp_path: Path) -> None:
    from ascl.serving.collections.faiss_index import GalleryIndex
    from ascl.serving.online.gallery import InProcessGallery

    a = models["a"]
    from_images, from_set, embedded = tmp_path / "idx-images", tmp_path / "idx-parquet", tmp_path / "set"
    assert main(["index", "build", "--model", str(a["folder"]), "--images", str(digits_folder),
                 "--out", str(from_images)]) == 0
    assert _embed(str(digits_folder), "--model", str(a["folder"]), "--out", str(embedded),
                  "--max-rows-per-file", "50") == 0
    assert main(["index", "build", "--from-parquet", str(embedded), "--out", str(from_set)]) == 0
    one, two = GalleryIndex.load(from_images), GalleryIndex.load(from_set)
    assert one.metadata == two.metadata and two.ntotal == 120
    assert two.manifest["model"]["weights"] == read_manifest(embedded)["model"]["weights"] \
        == one.manifest["model"]["weights"]
    queries = [f.read_bytes() for f in list_images(digits_folder)[::12]]
    hits_one = InProcessGallery(a["onnx"], from_images).search(queries, 5)
    hits_two = InProcessGallery(a["onnx"], from_set).search(queries, 5)
    for x, y in zip(hits_one, hits_two, strict=True):
        assert [h.name for h in x] == [h.name for h in y]
        np.testing.assert_allclose([h.score for h in x], [h.score for h in y], atol=1e-5)
    # again: everything is indexed already, no new version
    assert main(["index", "build", "--from-parquet", str(embedded), "--out", str(from_set)]) == 0
    assert GalleryIndex.load(from_set).version == two.version
    assert main(["index", "build", "--out", str(tmp_path / "x")]) == 2  # neither --images nor --from-parquet


def _int8_labelled_copy(onnx: Path, dest: Path) -> Path:
    """The same graph, labelled int8: an int8 export of the same weights carries the same source revision."""
    import onnx as onnx_lib

    from ascl.export.onnx_export import PRECISION_KEY, set_metadata

    model = onnx_lib.load(onnx)
    set_metadata(model, {PRECISION_KEY: "int8"})
    onnx_lib.save(model, dest)
    return dest


def test_embeddings_never_mix_across_models(models: dict[str, Any], digits_folder: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from ascl.export.identity import ModelMismatchError
    from ascl.serving.online.gallery import InProcessGallery

    a, b = models["a"], models["b"]
    images = str(digits_folder)
    set_a, idx_a, idx_b = tmp_path / "set-a", tmp_path / "idx-a", tmp_path / "idx-b"
    assert _embed(images, "--model", str(a["folder"]), "--out", str(set_a), "--limit", "30") == 0
    assert main(["index", "build", "--model", str(a["folder"]), "--images", images, "--out", str(idx_a),
                 "--limit", "30"]) == 0
    assert main(["index", "build", "--model", str(b["folder"]), "--images", images, "--out", str(idx_b),
                 "--limit", "30"]) == 0
    capsys.readouterr()

    def refused(argv: list[str]) -> str:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "model-a" in err and "model-b" in err and "cannot be mixed" in err, err
        return err

    err = refused(["embed", images, "--model", str(b["folder"]), "--out", str(set_a), "--no-progress"])
    assert f"sha256:{a['ref'].content_key}" in err and f"sha256:{b['ref'].content_key}" in err
    assert read_manifest(set_a)["count"] == 30  # nothing written
    refused(["index", "add", "--index", str(idx_a), "--model", str(b["folder"]), "--images", images])
    refused(["index", "build", "--from-parquet", str(set_a), "--out", str(idx_b)])
    refused(["index", "build", "--from-parquet", str(set_a), "--model", str(b["onnx"]), "--out", str(tmp_path / "n")])
    refused(["serve", "--model", str(b["folder"]), "--index", str(idx_a)])
    with pytest.raises(ModelMismatchError, match="model-b"):
        InProcessGallery(b["onnx"], idx_a)

    # an int8 export of the same weights is the same model; another source is not the same set
    int8 = _int8_labelled_copy(a["onnx"], tmp_path / "int8.onnx")
    assert main(["index", "add", "--index", str(idx_a), "--model", str(int8), "--images", images,
                 "--limit", "30"]) == 0
    InProcessGallery(int8, idx_a)
    assert _embed(images, "--model", str(int8), "--out", str(set_a), "--limit", "40") == 0
    assert read_manifest(set_a)["parts"][-1]["precision"] == "int8"
    assert _embed("digits", "--model", str(a["folder"]), "--out", str(set_a)) == 2
    assert "not of" in capsys.readouterr().err


def test_ray_engine_missing_says_what_to_install(models: dict[str, Any], digits_folder: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert _embed(str(digits_folder), "--model", str(models["a"]["onnx"]), "--out", str(tmp_path / "s"),
                  "--engine", "ray") == 2
    assert "pip install 'ascl-hub[scale]'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One local Ray instance for the module's Ray tests, stopped after them."""
    import ray
    import ray.data  # noqa: F401  (the engine's; a missing one fails here, not later)

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_engine_equals_the_local_engine(local_ray: Any, models: dict[str, Any], digits_folder: Path,
                                            tmp_path: Path) -> None:
    folder = _folder_with_bad_files(tmp_path, digits_folder)
    common = ["--model", str(models["a"]["folder"]), "--max-rows-per-file", "4", "--batch-size", "3"]
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert _embed(str(folder), *common, "--out", str(local)) == 0
    # through the CLI, on the running instance: 1 ONNX Runtime actor, decode tasks beside it
    assert _embed(str(folder), *common, "--out", str(distributed), "--engine", "ray", "--actors", "1",
                  "--threads", "1", "--decode-cpus", "0.5") == 0
    one, two = read_manifest(local), read_manifest(distributed)
    assert one["model"] == two["model"] and one["schema"] == two["schema"]
    assert [(p["file"], p["first_id"], p["end_id"], p["rows"], p["errors"]) for p in one["parts"]] == \
        [(p["file"], p["first_id"], p["end_id"], p["rows"], p["errors"]) for p in two["parts"]]
    assert read_errors(local) == read_errors(distributed) and len(read_errors(local)) == 3
    x, y = _rows(local), _rows(distributed)
    for column in ("id", "path", "label", "sha1", "size", "width", "height"):
        assert x[column] == y[column], column
    np.testing.assert_allclose(x["embedding"], y["embedding"], atol=1e-6)
    # the Ray engine resumes a set the same way (nothing left to do here)
    assert _embed(str(folder), *common, "--out", str(distributed), "--engine", "ray", "--actors", "1") == 0
    assert read_manifest(distributed)["parts"] == two["parts"]
    # and --from-parquet reads either
    for name, src in (("i1", local), ("i2", distributed)):
        assert main(["index", "build", "--from-parquet", str(src), "--out", str(tmp_path / name)]) == 0
    records = [json.loads(line) for line in (tmp_path / "i2" / "metadata.v1.jsonl").read_text().splitlines()]
    assert len(records) == 10 and records == [json.loads(line) for line in
                                              (tmp_path / "i1" / "metadata.v1.jsonl").read_text().splitlines()]
