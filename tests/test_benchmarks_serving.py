"""The serving benchmarks run end to end at a tiny size and write the records the README quotes.

``serve_load.py`` (two models served side by side through the service), ``soak.py`` (mixed good
and hostile traffic, memory watched) and ``default_model.py`` (demo-gallery precision@10 and int8
recall) on the offline CIFAR-10 copy, each a few seconds; the figures that matter come from
full runs on a quiet machine (benchmarks/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ascl.encoder import Encoder
from ascl.model_cards.publish import save_encoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_encoder(Encoder(width=8, image_size=32).eval(), tmp_path_factory.mktemp("bench") / "w8")


def run_benchmark(script: str, *args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "ASCL_CACHE": str(cache)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_serve_load_compares_two_models_in_one_run(narrow_model: Path, cifar_tar: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve_load.json"
    run_benchmark("serve_load.py", "--model", str(narrow_model), "--compare", "random-resnet18-w64", "--no-baseline",
                  "--duration", "1.5", "--levels", "1,4", "--gallery", "60", "--queries", "8", "--out", str(out),
                  cache=tmp_path / "cache")
    record = json.loads(out.read_text())
    assert [r["concurrency"] for r in record["triton"]] == [1, 4] == [r["concurrency"] for r in record["compare"]]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in record["triton"] + record["compare"])
    ratio = record["summary"]["qps_ratio_vs_compare"]["4"]
    assert ratio == pytest.approx(record["triton"][1]["qps"] / record["compare"][1]["qps"], rel=0.02)
    assert "width 8" in record["setup"]["model"] and "width 64" in record["setup"]["compare"]
    assert record["machine"]["cpu_simd"] is not None and "load_average_before" in record


def test_soak_counts_good_and_bad_requests(narrow_model: Path, cifar_tar: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run_benchmark("soak.py", "--model", str(narrow_model), "--duration", "5", "--concurrency", "3", "--gallery", "60",
                  "--out", str(out), cache=tmp_path / "cache")
    record = json.loads(out.read_text())
    counts = record["counts"]
    assert counts["good_ok"] > 0 and counts["bad_refused"] > 0
    assert counts["good_failed"] == 0 and counts["bad_accepted"] == 0
    codes = {code for kind in record["bad_codes"].values() for code in kind}
    assert codes <= {"StatusCode.INVALID_ARGUMENT", "StatusCode.RESOURCE_EXHAUSTED"}, codes
    assert record["memory_mib"]["peak"] > 0 and "trend_second_half_mib_per_min" in record["shm_mib"]


def test_default_model_quality_record(narrow_model: Path, cifar_tar: Path, tmp_path: Path) -> None:
    out = tmp_path / "default_model.json"
    run_benchmark("default_model.py", "--model", str(narrow_model), "--compare", "", "--queries-per-class", "3",
                  "--out", str(out), cache=tmp_path / "cache")
    record = json.loads(out.read_text())
    (row,) = record["models"]
    assert row["width"] == 8 and row["embedding_dim"] == 64
    for key in ("precision_at_10_fp32", "precision_at_10_int8", "int8_recall_at_10_vs_fp32"):
        assert 0.0 <= row[key] <= 1.0
    assert record["gallery_images"] == 2000 and "30 images of the held-out val split" in record["queries"]
