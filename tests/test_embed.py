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
import pytest
from serving_helpers import export_random_encoder

from ascl.cli import main
from ascl.images import list_images, load_image
from ascl.serving.collections.parquet_set import embeddings_of, read_errors, read_manifest, read_table

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One export cache for the module (the CLI calls in this process and the subprocesses use it)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASCL_CACHE", str(folder))
        yield folder


def _hub_model(root: Path, name: str, seed: int) -> tuple[Path, Any]:
    import torch

    from ascl.encoder import Encoder

    torch.manual_seed(seed)
    encoder = Encoder(width=16, image_size=32).eval()
    encoder.save_pretrained(root / name)
    return root / name, encoder


@pytest.fixture(scope="module")
def models(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two small random encoders as hub folders (model-a, model-b: 128-d), exported once into the cache."""
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


def test_resume_after_a_kill_loses_and_duplicates_nothing(cache: Path, tmp_path: Path) -> None:
    """SIGKILL after the first part is committed; the re-run equals an uninterrupted run."""
    from ascl.serving.collections.embed import embed_collection

    onnx = export_random_encoder(tmp_path / "full.onnx")  # full-width ResNet-18: slow enough to be caught
    args = ["digits", "--model", str(onnx), "--limit", "300", "--max-rows-per-file", "40", "--batch-size", "20"]
    out = tmp_path / "killed"
    env = {**os.environ, "ASCL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
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
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        yield ray
    finally:
        ray.shutdown()


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
