"""Parts of the benchmark scripts that a time-boxed device run relies on, checked on CPU:
the training deadline (time_to_accuracy.py --stop-at) and the GPU inference section's engine
probing (inference.py), which must drop an engine that cannot run instead of losing the rest."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str) -> ModuleType:
    """Import benchmarks/<name>.py (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_next_epoch_fits_uses_the_slowest_recent_epoch() -> None:
    fits = bench("time_to_accuracy").next_epoch_fits
    assert fits(0.0, 1e9, [5.0])  # no deadline
    assert fits(100.0, 90.0, [])  # nothing measured yet: the first epoch always runs
    assert fits(100.0, 90.0, [30.0, 4.0, 5.0, 6.0])  # the first epoch's compile time has left the window
    assert not fits(100.0, 90.0, [4.0, 11.0, 5.0])
    assert fits(100.0, 89.0, [4.0, 11.0, 5.0])


def test_time_to_accuracy_stops_at_its_deadline_and_still_records(tmp_path: Path) -> None:
    tta = bench("time_to_accuracy")
    args = tta.parse_args(["--device", "cpu", "--data", "digits", "--image-size", "8", "--subset", "64",
                           "--batch-size", "16", "--bn-splits", "2", "--queue-size", "32", "--knn-every", "50",
                           "--knn-val-subset", "40", "--workers", "0", "--no-compile", "--epochs", "50"])
    run, curve, facts = tta.train_and_monitor(tta.build_config(args), tmp_path, stop_at=time.time() + 1.0)
    assert facts["stopped_at_deadline"] is True
    assert 1 <= facts["epochs_done"] < 50 and run.epoch == facts["epochs_done"]
    assert curve[-1]["epoch"] == facts["epochs_done"]  # the kNN point of the last epoch trained
    assert facts["steps"] == facts["epochs_done"] * 4


def test_gpu_section_engines_run_on_cpu_and_a_failing_engine_is_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    inference = bench("inference")
    from ascl.export.golden import init_encoder

    torch.manual_seed(0)
    engines = inference.torch_engines(init_encoder(), "cpu", fast=True, compile=False)
    assert set(engines) == {"torch_eager_fp32", "torch_bf16_channels_last"}

    def broken(images: np.ndarray) -> object:
        raise RuntimeError("no such kernel")

    images = inference.digits_gallery(32, per_class=1)[1][:4]  # [4, 32, 32, 3] uint8
    kept, cosine = inference.working_engines({**engines, "broken": broken}, images, lambda: None)
    assert set(kept) == set(engines)
    assert cosine["torch_eager_fp32"] == pytest.approx(1.0, abs=1e-6)
    assert cosine["torch_bf16_channels_last"] > 0.95
    assert "skipping broken: first call failed (RuntimeError: no such kernel)" in capsys.readouterr().out
    rows = inference.time_batch(kept, images, 2, 0.01, lambda: None, "cpu")
    assert {r["engine"] for r in rows} == set(engines) and all(r["images_per_s"] > 0 for r in rows)


def test_digits_gallery_slices_hold_every_class() -> None:
    inference = bench("inference")
    source, images, labels = inference.load_gallery("digits", 16, 20)
    _, calib, calib_labels = inference.load_gallery("digits", 16, 10, offset=20)
    assert source == "sklearn digits" and images.shape == (20, 16, 16, 3) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10)) and sorted(set(calib_labels.tolist())) == list(range(10))
    assert calib.shape[0] == 10 and not any((calib[0] == im).all() for im in images)


def test_gpu_only_without_a_gpu_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --gpu-only would run")
    with pytest.raises(SystemExit) as exc:
        bench("inference").main(["--gpu-only", "--gallery", "digits", "--gallery-size", "10"])
    assert exc.value.code == 2
    assert "--gpu-only needs a CUDA GPU" in capsys.readouterr().err


def test_roofline_bounds_what_an_engine_can_gain_over_eager() -> None:
    inference = bench("inference")
    flops = 1.0e9  # per image
    rows = [{"engine": "torch_eager_fp32", "batch": 64, "images_per_s": 120.0},
            {"engine": "ort_fp32", "batch": 64, "images_per_s": 130.0},
            {"engine": "ort_int8", "batch": 64, "images_per_s": 280.0},
            {"engine": "torch_eager_fp32", "batch": 1, "images_per_s": 50.0},
            {"engine": "ort_fp32", "batch": 1, "images_per_s": 160.0},  # beats the sgemm roof: it becomes the roof
            {"engine": "ort_int8", "batch": 1, "images_per_s": 170.0}]
    roofs = {"fp32_gflops": 150.0, "int8_gops": 300.0}
    out = inference.roofline(rows, flops, roofs)
    assert [r["gflop_per_s"] for r in rows] == [120.0, 130.0, 280.0, 50.0, 160.0, 170.0]
    assert out["by_batch"]["64"] == {"eager_share_of_fp32_roof": 0.8, "fp32_ceiling_vs_eager": 1.25,
                                     "int8_ceiling_vs_eager": 2.5}
    assert out["by_batch"]["1"]["fp32_ceiling_vs_eager"] == 3.2 and out["by_batch"]["1"]["int8_ceiling_vs_eager"] == 6.0


def test_flops_and_gemm_roofs_are_measured() -> None:
    inference = bench("inference")
    from ascl.export.golden import init_encoder

    # ResNet-18 with the CIFAR stem at 32 px: 0.56 G multiply-adds per image, 2 FLOPs each
    assert inference.flops_per_image(init_encoder()) == pytest.approx(1.11e9, rel=0.01)
    roofs = inference.gemm_roofs(1, sizes=(64, 128), seconds=0.05)
    assert roofs["fp32_gflops"] == max(roofs["fp32_torch_gflops"], roofs["fp32_ort_gflops"]) > 0
    assert roofs["int8_gops"] > 0
    merged = inference.merge_roofs(roofs, {k: v * 2 if k == "int8_gops" else v / 2 for k, v in roofs.items()})
    assert merged == {**roofs, "int8_gops": 2 * roofs["int8_gops"]}
