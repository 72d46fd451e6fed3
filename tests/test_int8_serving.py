"""``ascl serve --precision int8`` / ``ascl up --precision int8``: the calibrated int8 encoder, served.

One real ``tritonserver`` start for the module: an index built with the shipped default model
(width 16, 32 px) from CIFAR-10 images, served with ``--precision int8`` (calibrated on the
index's own source images, verified against fp32); searches with gallery images find
themselves first, and the served encoder's ONNX metadata and config say int8. Without a server:
the int8 export is found in the cache on the next start (also by ``ascl up``, which starts from
the weights, not from the index's ONNX file), and it is refused, exit 2 with the measured
recall and the threshold and nothing started, when recall@10 vs fp32 misses ``--min-recall``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port, fresh_cache
from serving_helpers import processes_mentioning

from ascl.image_sources import iter_images

GALLERY = 200


@dataclass
class Setup:
    cache: Path
    index: Path
    source: str  # the index's image source spec
    env: dict[str, str]


def ascl(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ascl", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, cifar_tar: Path) -> Setup:
    root = tmp_path_factory.mktemp("int8")
    env = {**os.environ, "ASCL_CACHE": str(fresh_cache(root / "cache")), "PYTHONUNBUFFERED": "1"}
    source = f"cifar10-offline:{cifar_tar}"
    done = ascl(["index", "build", "--model", "default", "--images", source, "--limit", str(GALLERY),
                 "--out", str(root / "idx")], env)
    assert done.returncode == 0, done.stdout + done.stderr
    return Setup(root / "cache", root / "idx", source, env)


def ports() -> dict[str, int]:
    return {"--grpc-port": free_port(), "--http-port": free_port(), "--metrics-port": free_port()}


@dataclass
class Served:
    output: list[str]
    repository: Path
    grpc: str


@pytest.fixture(scope="module")
def served(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repository = tmp_path_factory.mktemp("int8-repo") / "models"
    chosen = ports()
    args = [sys.executable, "-m", "ascl", "serve", "--index", str(setup.index), "--precision", "int8",
            "--repository", str(repository)]
    for flag, port in chosen.items():
        args += [flag, str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=setup.env)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("ready:"):
                break
        else:
            pytest.fail(f"ascl serve exited with {proc.wait()} before ready:\n" + "\n".join(lines[-40:]))
        yield Served(lines, repository, f"127.0.0.1:{chosen['--grpc-port']}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    deadline = time.monotonic() + 10
    while processes_mentioning(str(repository)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(repository)) == []


@pytest.mark.triton
def test_int8_answers_searches_with_the_fp32_built_index(served: Served, setup: Setup) -> None:
    from ascl.serving import Client
    from ascl.serving.online.gallery import InProcessGallery, index_manifest

    items = list(iter_images(setup.source, limit=GALLERY))[::10]  # 20 gallery images
    queries = [item.read() for item in items]
    with Client(served.grpc) as client:
        results = client.search(queries, k=1)
    found_self = sum(hits[0].metadata.get("path") == item.path for item, hits in zip(items, results, strict=True))
    # fp32, in process over the same index: the very vectors it holds, so every image finds itself
    fp32 = InProcessGallery(index_manifest(setup.index)["model"]["onnx"], setup.index).search(queries, 1)
    found_self_fp32 = sum(row[0].name == item.path for item, row in zip(items, fp32, strict=True))
    assert found_self_fp32 == len(items)
    assert found_self >= found_self_fp32 - 1, (found_self, found_self_fp32)  # int8: within one image of fp32


@pytest.mark.triton
def test_startup_output_and_served_encoder_say_int8(served: Served, setup: Setup) -> None:
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = "\n".join(served.output)
    encoder_line = next(line for line in served.output if line.startswith("encoder: "))
    assert "encoder: int8, calibrated on 256 images of cifar10-offline" in encoder_line, text
    assert "recall@10 vs fp32 0.9" in encoder_line and "threshold 0.95" in encoder_line
    assert "quantized to " in encoder_line and str(setup.cache) in encoder_line
    assert "(int8 encoder)" in text
    model = onnx.load_model(served.repository / "encoder" / "1" / "model.onnx", load_external_data=False)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["ascl.precision"] == "int8"
    assert any(node.op_type == "QuantizeLinear" for node in model.graph.node)
    config = text_format.Parse((served.repository / "encoder" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.parameters["precision"].string_value == "int8"


@pytest.mark.triton
def test_second_start_finds_the_int8_export_in_the_cache(served: Served, setup: Setup, tmp_path: Path) -> None:
    from ascl.export.cache import cached_onnx, export_record
    from ascl.models import resolve_model

    int8_files = list((setup.cache / "models").glob("*/int8-*/encoder.onnx"))
    assert len(int8_files) == 1, int8_files
    made = int8_files[0].stat().st_mtime_ns
    began = time.monotonic()
    done = ascl(["serve", "--index", str(setup.index), "--precision", "int8", "--repository-only",
                 str(tmp_path / "repo")], setup.env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"cached at {int8_files[0]}" in done.stdout and "quantized to" not in done.stdout
    assert time.monotonic() - began < 60
    assert int8_files[0].stat().st_mtime_ns == made
    record = export_record(int8_files[0])
    assert record is not None and record["recall_at_10"] >= 0.95 and record["calibration"]["images"] == 256
    assert record["verification"]["images"] == 500 and not record["verification"]["overlaps_calibration"]
    assert record["calibration"]["source"] == record["verification"]["source"] == setup.source
    # `ascl up` starts from the weights, `ascl serve` from the index's fp32 file: the same cache entry
    path, made_now = cached_onnx(resolve_model("default"), cache=setup.cache, precision="int8",
                                 calibration=setup.source)
    assert (path, made_now) == (int8_files[0], False)


@pytest.mark.triton
def test_int8_below_min_recall_is_refused_and_nothing_starts(served: Served, setup: Setup, tmp_path: Path) -> None:
    chosen = ports()
    fresh = {**setup.env, "ASCL_CACHE": str(tmp_path / "fresh-cache")}  # quantized and measured now
    for env, how in ((fresh, "fresh"), (setup.env, "cached")):
        args = ["serve", "--index", str(setup.index), "--precision", "int8", "--min-recall", "0.999",
                "--repository", str(tmp_path / f"repo-{how}")]
        for flag, port in chosen.items():
            args += [flag, str(port)]
        done = ascl(args, env)
        out = done.stdout + done.stderr
        assert done.returncode == 2, out
        assert "int8 refused, nothing" in out and "recall@10 vs fp32 0.9" in out
        assert "below the threshold 0.999" in out and "Traceback" not in out
        assert "starting tritonserver" not in out and not (tmp_path / f"repo-{how}").exists()
        assert processes_mentioning(str(tmp_path / f"repo-{how}")) == []
    assert not list((tmp_path / "fresh-cache" / "models").glob("*/int8-*"))  # nothing written


@pytest.mark.slow
def test_calibration_default_and_its_error(setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import ascl.image_sources
    from ascl.export.cache import CalibrationNeededError
    from ascl.serving.collections.build import build_index
    from ascl.serving.online.precision import default_calibration, index_sources

    assert index_sources(setup.index)[0].startswith("cifar10-offline:")
    assert default_calibration(setup.index) == index_sources(setup.index)[0]
    gallery = tmp_path / "gallery"
    for item in iter_images(setup.source, limit=12):
        (gallery / str(item.label)).mkdir(parents=True, exist_ok=True)
        (gallery / str(item.label) / Path(item.path).name).write_bytes(item.read())
    onnx_path = next((setup.cache / "models").glob("*/encoder.onnx"))
    build_index(onnx_path, str(gallery), tmp_path / "idx", progress=False)
    assert default_calibration(tmp_path / "idx") == str(gallery.resolve())
    shutil.rmtree(gallery)  # the index's images are no longer on this machine
    assert default_calibration(tmp_path / "idx").startswith("cifar10-offline:")  # the CIFAR-10 copy, found
    monkeypatch.setattr(ascl.image_sources, "default_cifar_tar", lambda: None)
    with pytest.raises(CalibrationNeededError, match="pass --calibration IMAGES"):
        default_calibration(tmp_path / "idx")


@pytest.mark.slow
def test_up_serves_the_int8_copy_calibrated_on_its_gallery(setup: Setup, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``ascl up --precision int8`` up to the server start: the index is fp32-built, the file to serve is
    the int8 copy calibrated on the gallery's own images (no Triton needed to see that)."""
    from ascl.demo.up import Ports, Timings, UpOptions, prepare
    from ascl.export.runtime import OnnxEmbedder

    gallery = tmp_path / "gallery"
    for item in iter_images(setup.source, limit=300):
        (gallery / str(item.label)).mkdir(parents=True, exist_ok=True)
        (gallery / str(item.label) / Path(item.path).name).write_bytes(item.read())
    opts = UpOptions(model=None, gallery=str(gallery), ports=Ports(), cache=setup.cache, gallery_size=300,
                     precision="int8")
    timings = Timings()
    _, onnx_path, _, index_dir = prepare(opts, timings)
    out = capsys.readouterr().out
    assert OnnxEmbedder(onnx_path).precision == "int8" and "int8" in timings.steps
    assert f"calibrated on 256 images of {gallery.resolve()}" in out and "verification images" in out
    from ascl.serving.online.gallery import index_manifest

    assert OnnxEmbedder(index_manifest(index_dir)["model"]["onnx"]).precision == "fp32"  # the index: fp32-built
