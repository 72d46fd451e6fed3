"""The GPU benchmarks at a tiny CPU size, through the prepared device script (TINY=1).

One run covers them all: ``device_gpu.sh`` calls ``inference.py`` (its CPU section on digits),
``train_throughput.py`` (reference and fast path side by side, batch 8, --no-compile) and
``time_to_accuracy.py`` (1 epoch), then gathers what a device call brings back: one results
JSON (with the whole log), the curve PNG and the encoder as a sharded hub folder, 8 files of at
most 16 MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
pytestmark = pytest.mark.slow  # ~1-2 minutes on 2 cores: three short processes of ResNet-18 steps


@pytest.fixture(scope="module")
def device_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("gpu_out")
    env = {**os.environ, "TINY": "1", "PYTHON": sys.executable, "OUT": str(out),
           "ASCL_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_gpu.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_device_script_output_fits_the_device_limits(device_run: tuple[Path, str]) -> None:
    out, _ = device_run
    files = sorted(p for p in out.rglob("*") if p.is_file())
    names = {str(p.relative_to(out)) for p in files}
    assert len(files) <= 8, names
    assert {"results_gpu.json", "time_to_accuracy.png", "encoder/config.json",
            "encoder/model.safetensors.index.json"} <= names
    assert all(p.stat().st_size < 16 * MIB for p in files)
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert (out / "time_to_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_hold_the_inference_record_and_the_whole_log(device_run: tuple[Path, str]) -> None:
    out, stdout = device_run
    results = json.loads((out / "results_gpu.json").read_text())
    inference = results["inference"]
    engines = {r["engine"] for r in inference["results"]}
    assert engines == {"torch_eager_fp32", "ort_fp32", "ort_int8"}
    assert all(r["images_per_s"] > 0 and r["batch"] == 2 for r in inference["results"])
    quality = inference["int8_quality"]
    assert quality["images"] == 40 and inference["goals"]["int8_recall_at_10"]["value"] == quality["recall_at_10_vs_fp32"]
    # int8 within a small margin of fp32: most of each image's neighbours kept, kNN within 3 of the 40 images
    assert quality["recall_at_10_vs_fp32"] >= 0.8 and quality["min_cosine_vs_fp32"] > 0.9, quality
    assert abs(quality["knn_top1_int8"] - quality["knn_top1_fp32"]) <= 3 / 40, quality
    assert inference["roofline"]["by_batch"]["2"]["fp32_ceiling_vs_eager"] > 0 and "simd" in inference["machine"]
    log = "\n".join(results["log"])
    assert "inference --batch-sizes 2" in log and "fast / reference:" in log and "done (inference rc=0" in log
    assert not (out / "device_log.txt").exists()


def test_throughput_record(device_run: tuple[Path, str]) -> None:
    out, stdout = device_run
    tp = json.loads((out / "results_gpu.json").read_text())["train_throughput"]
    assert tp["batch_size"] == 8 and tp["compile"] is False and tp["device_type"] == "cpu"
    assert tp["torch"] and "train_throughput.py" in tp["command"] and "--no-compile" in tp["command"]
    for name in ("reference", "fast", "reference_step_only", "fast_step_only"):
        assert tp["results"][name]["pairs_per_s"] > 0
    ratio = tp["results"]["fast"]["pairs_per_s"] / tp["results"]["reference"]["pairs_per_s"]
    assert tp["ratio_fast_over_reference"] == pytest.approx(ratio, rel=0.02)
    assert "fast / reference:" in stdout


def test_time_to_accuracy_record_and_encoder(device_run: tuple[Path, str]) -> None:
    out, _ = device_run
    tta = json.loads((out / "results_gpu.json").read_text())["time_to_accuracy"]
    assert tta["recipe"]["epochs"] == 1 and tta["recipe"]["t1"] == 0.1 and tta["recipe"]["t2"] == 0.05
    assert tta["recipe"]["lr"] == pytest.approx(0.06 * 16 / 256)
    assert [row["epoch"] for row in tta["curve"]] == [1]
    assert tta["final_knn_top1"] == tta["curve"][-1]["knn_top1"]
    # each figure is a share of the val images it was measured on: --knn-val-subset 40 for the kNN
    # monitor, the whole digits val split for the probe (one epoch at TINY: it has not learnt much)
    from ascl.training.data import load_split

    for value, images in ((tta["final_knn_top1"], 40), (tta["linear_probe_top1"], len(load_split("digits", "val")))):
        correct = value * images / 100
        assert abs(correct - round(correct)) < 0.01 * images / 100 + 1e-9, (value, images)
    # digits: random conv features alone separate them far above chance (10%), so a kNN vote that reads
    # the wrong labels or ignores the bank is caught; what training adds is test_training's check
    assert tta["final_knn_top1"] > 30, tta
    assert tta["train_seconds"] > 0 and tta["steps"] == 2

    from ascl.hub import load_encoder

    encoder = load_encoder(str(out / "encoder"))
    assert encoder.image_size == 8 and encoder.arch == "resnet18"
    assert len(tta["encoder_files"]) >= 2  # sharded: ResNet-18 is ~45 MB, shards are < 16 MiB
