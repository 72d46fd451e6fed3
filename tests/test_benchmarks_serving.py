"""The serving benchmarks run end to end at a tiny size and write the records the README quotes.

``serve_load.py`` (two models served side by side through the service, the lean single-process
server and the in-process floor), ``lean_server.py`` (that server alone, against the index it
serves), ``soak.py`` (mixed good and bad traffic, then idle-connection floods, compression bombs and
oversized data: URLs to the demo page beside good traffic, memory watched), ``front_door.py`` (the
front door's share of a request) and ``default_model.py``
(demo-gallery precision@10 and int8 recall) on the offline CIFAR-10 copy, each a few seconds; the
figures that matter come from full runs on a quiet machine (benchmarks/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
                  "--no-int8", "--no-ab", "--no-lean", "--latency-requests", "0", "--duration", "1.5", "--levels", "1,4",
                  "--gallery", "60", "--queries", "8", "--engine-seconds", "0.2", "--out", str(out),
                  cache=tmp_path / "cache")
    record = json.loads(out.read_text())
    assert [r["concurrency"] for r in record["triton"]] == [1, 4] == [r["concurrency"] for r in record["compare"]]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in record["triton"] + record["compare"])
    ratio = record["summary"]["qps_ratio_vs_compare"]["4"]
    assert ratio == pytest.approx(record["triton"][1]["qps"] / record["compare"][1]["qps"], rel=0.02)
    assert "width 8" in record["setup"]["model"] and "width 64" in record["setup"]["compare"]
    assert record["machine"]["cpu_simd"] is not None and "load_average_before" in record
    assert all("load_average" in r and r["mean_batch"] >= 1 for r in record["triton"])
    for row in record["triton"]:  # where the CPU went per request: the fused model, tritonserver, the client
        cpu = row["cpu_ms_per_request"]
        assert cpu["image_search"] > 0 and cpu["tritonserver"] > 0 and cpu["client"] > 0
    for name in ("fp32", "compare"):  # the encoder alone, at the batch sizes the server formed
        engine = record["engine_only"][name]
        assert engine["images_per_s"] > 0 and engine["sessions"] >= 1 and engine["batch_histogram"]
        assert engine["decode_images_per_s_one_thread"] > 0
        assert record["summary"]["served_over_engine"][name] > 0


def serve_load_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve_load", ROOT / "benchmarks" / "serve_load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_serve_load_goals_from_rows() -> None:
    """The summary's ratios and goals, from rows made up for the purpose (pure)."""
    sl = serve_load_module()

    def rows(*qps: float, errors: int = 0) -> list[dict[str, Any]]:
        return [{"concurrency": c, "qps": q, "errors": errors, "p99_ms": 10.0} for c, q in zip((1, 8, 32), qps,
                                                                                             strict=True)]

    engines = {"fp32": {"images_per_s": 1000.0, "images_per_s_one_session": 500.0, "rates": {4: 1000.0}},
               "compare": {"images_per_s": 100.0, "images_per_s_one_session": 50.0, "rates": {4: 100.0}}}
    latency = {"floor": {"median_ms": 2.0, "parts_median_ms": {"decode": 0.3}}, "triton": {"median_ms": 3.8},
               "lean": {"median_ms": 3.0}}
    summary = sl.summarize({"triton": rows(200, 500, 600), "lean": rows(180, 480, 700), "baseline": rows(150, 160, 140),
                            "compare": rows(40, 90, 96), "delayed": rows(150, 500, 660)}, engines, {4: 10}, latency)
    assert summary["qps_ratio_vs_lean"] == {"1": 1.111, "8": 1.042, "32": 0.857}
    assert summary["qps_ratio_delayed_vs_served"] == {"1": 0.75, "8": 1.0, "32": 1.1}
    assert summary["served_over_engine"] == {"fp32": 0.6, "compare": 0.96}
    assert summary["latency_at_1"]["served_over_floor"] == 1.9 and summary["latency_at_1"]["lean_over_floor"] == 1.5
    goals = summary["goals"]
    assert goals["latency_at_1_over_floor"]["met"] and goals["fp32_served_over_engine"]["met"]
    assert goals["compare_served_over_engine"]["met"] and goals["zero_errors"]["met"]
    assert goals["never_slower_than_naive"] == {"goal": 1.0, "value": 1.333, "met": True}
    assert goals["served_over_lean_at_8_and_32"]["value"] == 0.857 and not goals["served_over_lean_at_8_and_32"]["met"]
    assert goals["int8_qps_ratio"]["met"] is None  # no int8 row in this run
    slow = sl.summarize({"triton": rows(100, 500, 600, errors=1), "baseline": rows(150, 160, 140)}, engines, {4: 10},
                        {"floor": latency["floor"], "triton": {"median_ms": 4.2}})["goals"]
    assert not slow["zero_errors"]["met"] and not slow["never_slower_than_naive"]["met"]
    assert not slow["latency_at_1_over_floor"]["met"] and slow["served_over_lean_at_8_and_32"]["met"] is None


@pytest.mark.triton
@pytest.mark.slow
def test_serve_load_int8_row_and_engine_parts(cifar_tar: Path, tmp_path: Path) -> None:
    """The --precision int8 service of the shipped default in the same run, and the pure parts."""
    sl = serve_load_module()
    before = {"batch_stats": [{"batch_size": 1, "compute_infer": {"count": 5, "ns": 1}}]}
    after = {"batch_stats": [{"batch_size": 1, "compute_infer": {"count": 7, "ns": 1}},
                             {"batch_size": 4, "compute_infer": {"count": 3, "ns": 1}}]}
    histogram = sl.batch_histogram(before, after)
    assert histogram == {1: 2, 4: 3} and sl.mean_batch(histogram) == pytest.approx(14 / 5)
    assert sl.representative_batches({1: 100, 4: 30, 8: 1}, k=2) == [1, 4]  # 100 and 120 images
    # 2 images at 100/s (0.02 s) + 15 at 300/s (0.05 s; 5 is nearest to 4): 17 images in 0.07 s
    assert sl.weighted_rate({1: 2, 5: 3}, {1: 100.0, 4: 300.0}) == pytest.approx(17 / 0.07)

    out = tmp_path / "serve_load.json"
    run_benchmark("serve_load.py", "--compare", "", "--no-baseline", "--no-lean", "--latency-requests", "0",
                  "--ab-delay-us", "300", "--duration", "1.5", "--levels", "4", "--gallery", "60", "--queries", "8",
                  "--engine-seconds", "0.2", "--out", str(out), cache=tmp_path / "cache")
    record = json.loads(out.read_text())
    assert "recall@10 vs fp32" in record["setup"]["int8"]
    assert record["int8"][0]["requests"] > 0 and record["int8"][0]["errors"] == 0
    assert record["engine_only"]["int8"]["precision"] == "int8"
    summary = record["summary"]
    assert summary["int8_qps_ratio_at_4"] == pytest.approx(record["int8"][0]["qps"] / record["triton"][0]["qps"],
                                                           rel=0.02)
    assert summary["qps_ratio_delayed_vs_served"]["4"] == pytest.approx(  # the queue-delay A/B row
        record["delayed"][0]["qps"] / record["triton"][0]["qps"], rel=0.02)
    assert record["delayed"][0]["errors"] == 0 and "300 us" in record["setup"]["delayed"]
    assert summary["int8_engine_ratio"] > 0 and summary["goals"]["int8_qps_ratio"]["value"] == summary["int8_qps_ratio_at_4"]


@pytest.mark.triton
@pytest.mark.slow
def test_serve_load_lean_baseline_and_the_in_process_floor(narrow_model: Path, cifar_tar: Path,
                                                           tmp_path: Path) -> None:
    """The lean single-process server and the concurrency-1 floor in the same run as the service."""
    out = tmp_path / "serve_load.json"
    run_benchmark("serve_load.py", "--model", str(narrow_model), "--compare", "", "--no-int8", "--no-ab",
                  "--latency-requests", "20", "--duration", "1.5", "--levels", "1,4", "--gallery", "60", "--queries",
                  "8", "--engine-seconds", "0.2", "--out", str(out), cache=tmp_path / "cache")
    record = json.loads(out.read_text())
    assert [r["concurrency"] for r in record["lean"]] == [1, 4] == [r["concurrency"] for r in record["baseline"]]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in record["lean"] + record["triton"])
    assert all(r["cpu_ms_per_request"]["lean_server"] > 0 for r in record["lean"])
    summary = record["summary"]
    for level, (served, lean, naive) in enumerate(zip(record["triton"], record["lean"], record["baseline"], strict=True)):
        key = str(served["concurrency"])
        assert summary["qps_ratio_vs_lean"][key] == pytest.approx(served["qps"] / lean["qps"], rel=0.01), level
        assert summary["qps_ratio_vs_baseline"][key] == pytest.approx(served["qps"] / naive["qps"], rel=0.01), level
    latency = summary["latency_at_1"]  # medians of 20 sequential one-image searches, and of the floor
    assert record["latency_at_1"]["floor"]["requests"] == record["latency_at_1"]["triton"]["requests"] == 20
    assert 0 < latency["floor_ms"] < latency["served_ms"] and latency["lean_ms"] > 0
    assert latency["served_over_floor"] == pytest.approx(latency["served_ms"] / latency["floor_ms"], rel=0.01)
    assert set(latency["floor_parts_ms"]) == {"decode", "embed", "search"}
    goals = summary["goals"]
    assert goals["latency_at_1_over_floor"]["value"] == latency["served_over_floor"]
    assert goals["never_slower_than_naive"]["value"] == min(summary["qps_ratio_vs_baseline"].values())
    assert goals["served_over_lean_at_8_and_32"]["met"] is None  # this run had neither level
    assert goals["zero_errors"]["met"] is True


@pytest.mark.slow
def test_lean_server_answers_like_the_index_it_serves(tmp_path: Path, digits_folder: Path) -> None:
    """The lean baseline is a real search server: the index's own neighbours, bad input refused alone."""
    import numpy as np
    from conftest import free_port
    from serving_helpers import export_random_encoder
    from tritonclient.utils import InferenceServerException

    from ascl.export.runtime import OnnxEmbedder
    from ascl.images import list_images, load_image
    from ascl.serving import Client
    from ascl.serving.collections.build import build_index
    from ascl.serving.collections.index import open_index

    onnx_path = export_random_encoder(tmp_path / "encoder.onnx")
    build_index(onnx_path, str(digits_folder), tmp_path / "idx", progress=False)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "lean_server.py"), "--port", str(port),
                             "--onnx", str(onnx_path), "--index", str(tmp_path / "idx"), "--workers", "2"])
    try:
        files = list_images(digits_folder)[:6]
        with Client(f"127.0.0.1:{port}") as client:
            for _ in range(240):
                if proc.poll() is None and client.is_ready():
                    break
                time.sleep(0.5)
            results = client.search(files, k=4)
            with pytest.raises(InferenceServerException) as err:
                client.search([b"not an image"], k=4)
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "not a readable image" in str(err.value)
            assert client.search(files[:1], k=4)[0][0].id == results[0][0].id  # still serving
        queries = OnnxEmbedder(onnx_path).embed(np.stack([load_image(f, 32) for f in files]))
        expected = open_index(tmp_path / "idx").hits(queries, 4)
        for got, want in zip(results, expected, strict=True):
            assert [h.id for h in got] == [h.id for h in want]
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
            assert [h.metadata for h in got] == [dict(h.metadata) for h in want]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


@pytest.mark.triton
@pytest.mark.slow
def test_soak_counts_good_and_bad_requests_and_hostile_rows(narrow_model: Path, cifar_tar: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run_benchmark("soak.py", "--model", str(narrow_model), "--duration", "5", "--concurrency", "3", "--gallery", "60",
                  "--phase", "4", "--settle", "2", "--flood", "100", "--bomb-mb", "64", "--data-url-mb", "4",
                  "--out", str(out), cache=tmp_path / "cache")
    record = json.loads(out.read_text())
    counts = record["counts"]
    assert counts["good_ok"] > 0 and counts["bad_refused"] > 0
    assert counts["good_failed"] == 0 and counts["bad_accepted"] == 0
    codes = {code for kind in record["bad_codes"].values() for code in kind}
    assert codes <= {"StatusCode.INVALID_ARGUMENT", "StatusCode.RESOURCE_EXHAUSTED"}, codes
    assert record["memory_mib"]["peak"] > 0 and "trend_second_half_mib_per_min" in record["shm_mib"]
    hostile = record["hostile"]
    assert hostile["quiet"]["good"] > 0 and hostile["quiet"]["service_mib"] > 0
    for attack in ("idle_flood", "compression_bombs", "data_urls"):
        row = hostile[attack]
        assert row["good"] > 0 and row["good_failed"] == 0, row
        assert set(row["goals"]) == {"zero_failed_good", "p99_within_2x_quiet", "memory_back_within_10pct"}
    assert set(hostile["compression_bombs"]["attack_outcomes"]) == {"413"}  # every bomb refused, none served
    assert all(o in ("413", "ConnectionResetError", "BrokenPipeError")
               for o in hostile["data_urls"]["attack_outcomes"]), hostile["data_urls"]["attack_outcomes"]


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


@pytest.mark.triton
@pytest.mark.slow
def test_front_door_share_record(narrow_model: Path, cifar_tar: Path, tmp_path: Path) -> None:
    out = tmp_path / "front_door.json"
    run_benchmark("front_door.py", "--model", str(narrow_model), "--gallery", "60", "--levels", "2", "--duration", "1",
                  "--warmup", "0.5", "--rounds", "1", "--idle", "1", "--out", str(out), cache=tmp_path / "cache")
    record = json.loads(out.read_text())
    current = record["results"]["current"]
    for key in ("grpc_c2", "http_c2"):
        row = current[key]
        assert row["door"]["requests"] > 0 and row["door"]["errors"] == 0 and row["direct"]["errors"] == 0
        assert row["door"]["door_cpu_us"] > 0 and row["door"]["triton_cpu_us"] > 0 and 0 < row["door_share"] < 1
    assert current["http_gzip_c2"]["door"]["errors"] == 0  # compressed requests through the door
    assert record["machine"]["cpu_simd"] is not None and "load_average_before" in record
