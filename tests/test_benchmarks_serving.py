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
from conftest import fresh_cache

from ascl.encoder import Encoder
from ascl.model_cards.publish import save_encoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_encoder(Encoder(width=8, image_size=32).eval(), tmp_path_factory.mktemp("bench") / "w8")


def run_benchmark(script: str, *args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "ASCL_CACHE": str(fresh_cache(cache))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.triton
@pytest.mark.slow
def test_serve_load_compares_two_models_in_one_run(narrow_model: Path, cifar_tar: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve_load.json"
    run_benchmark("serve_load.py", "--model", str(narrow_model), "--compare", "random-resnet18-w64", "--no-baseline",
                  "--no-int8", "--no-ab", "--duration", "1.5", "--levels", "1,4", "--gallery", "60", "--queries", "8",
                  "--engine-seconds", "0.2", "--out", str(out), cache=tmp_path / "cache")
    record = json.loads(out.read_text())
    assert [r["concurrency"] for r in record["triton"]] == [1, 4] == [r["concurrency"] for r in record["compare"]]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in record["triton"] + record["compare"])
    ratio = record["summary"]["qps_ratio_vs_compare"]["4"]
    assert ratio == pytest.approx(record["triton"][1]["qps"] / record["compare"][1]["qps"], rel=0.02)
    assert "width 8" in record["setup"]["model"] and "width 64" in record["setup"]["compare"]
    assert record["machine"]["cpu_simd"] is not None and "load_average_before" in record
    assert all("load_average" in r and r["encoder_mean_batch"] >= 1 for r in record["triton"])
    for name in ("fp32", "compare"):  # the encoder alone, at the batch sizes the server formed
        engine = record["engine_only"][name]
        assert engine["images_per_s"] > 0 and engine["sessions"] >= 1 and engine["batch_histogram"]
        assert engine["decode_images_per_s_one_thread"] > 0
        assert record["summary"]["served_over_engine"][name] > 0


@pytest.mark.triton
@pytest.mark.slow
def test_serve_load_int8_row_and_engine_parts(cifar_tar: Path, tmp_path: Path) -> None:
    """The --precision int8 service of the shipped default in the same run, and the pure parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve_load", ROOT / "benchmarks" / "serve_load.py")
    assert spec is not None and spec.loader is not None
    sl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sl)
    before = {"batch_stats": [{"batch_size": 1, "compute_infer": {"count": 5, "ns": 1}}]}
    after = {"batch_stats": [{"batch_size": 1, "compute_infer": {"count": 7, "ns": 1}},
                             {"batch_size": 4, "compute_infer": {"count": 3, "ns": 1}}]}
    histogram = sl.batch_histogram(before, after)
    assert histogram == {1: 2, 4: 3} and sl.mean_batch(histogram) == pytest.approx(14 / 5)
    assert sl.representative_batches({1: 100, 4: 30, 8: 1}, k=2) == [1, 4]  # 100 and 120 images
    # 2 images at 100/s (0.02 s) + 15 at 300/s (0.05 s; 5 is nearest to 4): 17 images in 0.07 s
    assert sl.weighted_rate({1: 2, 5: 3}, {1: 100.0, 4: 300.0}) == pytest.approx(17 / 0.07)

    out = tmp_path / "serve_load.json"
    run_benchmark("serve_load.py", "--compare", "", "--no-baseline", "--duration", "1.5", "--levels", "4",
                  "--gallery", "60", "--queries", "8", "--engine-seconds", "0.2", "--out", str(out),
                  cache=tmp_path / "cache")
    record = json.loads(out.read_text())
    assert "recall@10 vs fp32" in record["setup"]["int8"]
    assert record["int8"][0]["requests"] > 0 and record["int8"][0]["errors"] == 0
    assert record["engine_only"]["int8"]["precision"] == "int8"
    summary = record["summary"]
    assert summary["int8_qps_ratio_at_4"] == pytest.approx(record["int8"][0]["qps"] / record["triton"][0]["qps"],
                                                           rel=0.02)
    assert summary["qps_ratio_nowait_vs_served"]["4"] > 0 and record["nowait"][0]["errors"] == 0  # the A/B row
    assert summary["int8_engine_ratio"] > 0 and set(summary["goals"]) == {
        "zero_errors", "fp32_served_over_engine", "int8_qps_ratio"}


@pytest.mark.triton
@pytest.mark.slow
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


@pytest.mark.slow
def test_default_model_quality_record(narrow_model: Path, cifar_tar: Path, tmp_path: Path) -> None:
    """The shipped default against a random network in one run: far above it on held-out photos of
    its own domain, and its int8 copy within a small margin of its fp32 graph."""
    out = tmp_path / "default_model.json"
    run_benchmark("default_model.py", "--model", "default", "--compare", str(narrow_model), "--queries-per-class",
                  "5", "--out", str(out), cache=tmp_path / "cache")
    record = json.loads(out.read_text())
    default, random_w8 = record["models"]
    assert (default["width"], default["embedding_dim"]) == (16, 128) and random_w8["width"] == 8
    assert record["gallery_images"] == 2000 and "50 images of the held-out val split" in record["queries"]
    # README, Status: 48.5% against 20.7% for random weights (1,000 queries); 50 queries here
    assert default["precision_at_10_fp32"] >= random_w8["precision_at_10_fp32"] + 0.15, record["models"]
    assert abs(default["precision_at_10_int8"] - default["precision_at_10_fp32"]) <= 0.05, default
    assert default["int8_recall_at_10_vs_fp32"] >= 0.9 and default["int8_min_cosine"] > 0.9, default
