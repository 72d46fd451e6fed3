"""Inference throughput and latency: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8.

All engines run in one process on the same images, interleaved call by call at each batch size
(so a noisy neighbour on a shared machine slows all of them alike), and the ratios to eager are
computed from those same measurements. On a GPU it adds eager fp32, bf16 autocast +
channels_last, torch.compile and ONNX Runtime CUDA / TensorRT at a large batch. Inputs are
uint8 NHWC numpy arrays on the host for every engine (the serving contract), so host-to-device
copies are included on a GPU. Also measures int8 recall@10 vs fp32 on a labelled gallery.

    python benchmarks/inference.py                       # CPU, deterministic-init resnet18
    python benchmarks/inference.py --model runs/x        # any MODEL that 'ascl export onnx' takes

Writes benchmarks/results/inference-<device>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"ort_fp32_vs_eager": 1.5, "ort_int8_vs_eager": 2.5, "int8_recall_at_10": 0.95, "gpu_best_vs_eager": 3.0}

Engine = Callable[[np.ndarray], object]  # uint8 [N, S, S, 3] -> embeddings (any array type)


def digits_gallery(size: int, per_class: int = 100) -> tuple[str, np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 RGB at ``size`` px, when no CIFAR-10 copy is around."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == c)[:per_class] for c in range(10)])
    images = [
        np.asarray(Image.fromarray((digits.images[i] / 16 * 255).astype(np.uint8)).resize((size, size)).convert("RGB"))
        for i in keep
    ]
    return "sklearn digits", np.stack(images), digits.target[keep].astype(np.int64)


def load_gallery(source: str | None, size: int, count: int, offset: int = 0) -> tuple[str, np.ndarray, np.ndarray | None]:
    from ascl.export.image_sets import default_source, load_image_set

    chosen = source or default_source()
    if chosen is None:
        return digits_gallery(size)
    s = load_image_set(chosen, size, count=count, offset=offset)
    return s.source, s.images, s.labels


def time_interleaved(engines: dict[str, Engine], images: np.ndarray, seconds: float, sync: Callable[[], None]
                     ) -> dict[str, dict[str, Any]]:
    """Round-robin one call per engine until each has had ``seconds`` (min 3 calls after 1 warm-up)."""
    for run in engines.values():  # warm-up (lazy init, compilation, caches)
        run(images)
        sync()
    laps: dict[str, list[float]] = {name: [] for name in engines}
    while any(sum(v) < seconds or len(v) < 3 for v in laps.values()):
        for name, run in engines.items():
            if sum(laps[name]) >= seconds and len(laps[name]) >= 3:
                continue
            start = time.perf_counter()
            run(images)
            sync()
            laps[name].append(time.perf_counter() - start)
    out: dict[str, dict[str, Any]] = {}
    for name, v in laps.items():
        arr = np.array(v)
        out[name] = {
            "images_per_s": float(len(images) * len(arr) / arr.sum()),
            "p50_ms": float(np.percentile(arr, 50) * 1e3),
            "p99_ms": float(np.percentile(arr, 99) * 1e3),
            "calls": len(arr),
        }
    return out


def time_batch(engines: dict[str, Engine], gallery: np.ndarray, batch: int, seconds: float,
               sync: Callable[[], None], device: str) -> list[dict[str, Any]]:
    """Time every engine on one batch of gallery images; rows with the ratio to eager, printed."""
    images = np.ascontiguousarray(np.resize(gallery, (batch, *gallery.shape[1:])))  # [B, S, S, 3]
    timed = time_interleaved(engines, images, seconds, sync)
    rows = []
    for name, r in timed.items():
        r |= {"engine": name, "device": device, "batch": batch,
              "vs_eager": r["images_per_s"] / timed["torch_eager_fp32"]["images_per_s"]}
        rows.append(r)
        print(f"{device} batch {batch:4d} {name:34s} {r['images_per_s']:9.1f} img/s  p50 {r['p50_ms']:8.2f} ms  "
              f"p99 {r['p99_ms']:8.2f} ms  x{r['vs_eager']:.2f} vs eager", flush=True)
    return rows


def ort_engine(path: Path, providers: list, threads: int) -> Engine:
    """ONNX Runtime with worker spinning off: idle ORT threads would otherwise busy-wait and slow the
    next (interleaved) engine; it costs ORT a little, so the ratios err against it."""
    from ascl.export.runtime import OnnxEmbedder

    embedder = OnnxEmbedder(path, providers=providers, threads=threads, spinning=False)
    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if embedder.providers[0] != first:
        raise RuntimeError(f"{first} did not start (session runs on {embedder.providers})")
    return embedder.embed


def torch_engines(encoder, device: str) -> dict[str, Engine]:  # type: ignore[no-untyped-def]
    import torch

    model = encoder.to(device).eval()

    def eager(images: np.ndarray) -> object:
        with torch.inference_mode():
            return model.embed_uint8(torch.from_numpy(images).to(device)).cpu()

    engines: dict[str, Engine] = {"torch_eager_fp32": eager}
    if device == "cuda":
        import copy

        fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
        compiled = torch.compile(fast)

        def bf16(images: np.ndarray, net: Callable = fast) -> object:  # type: ignore[type-arg]
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                x = fast.normalize_uint8(torch.from_numpy(images).to(device)).contiguous(memory_format=torch.channels_last)
                return net(x).float().cpu()

        engines["torch_bf16_channels_last"] = bf16
        engines["torch_compile_bf16_channels_last"] = lambda images: bf16(images, compiled)
    return engines


def build_onnx(encoder, work: Path, calib: np.ndarray) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    import onnx

    from ascl.export.onnx_export import PRECISION_KEY, encoder_to_onnx, set_metadata
    from ascl.export.quantize import quantize_int8

    fp32 = encoder_to_onnx(encoder)
    int8 = quantize_int8(fp32, calib)
    set_metadata(int8, {e.key: e.value for e in fp32.metadata_props} | {PRECISION_KEY: "int8"})
    paths = work / "encoder.onnx", work / "encoder_int8.onnx"
    onnx.save(fp32, paths[0])
    onnx.save(int8, paths[1])
    return paths


def recall_section(fp32: Engine, int8: Engine, source: str, images: np.ndarray, labels: np.ndarray | None) -> dict:
    from ascl.export.parity import embed_in_batches, knn_top1, recall_at_k, row_cosine

    ref = embed_in_batches(fp32, images, 64)  # type: ignore[arg-type]
    cand = embed_in_batches(int8, images, 64)  # type: ignore[arg-type]
    out = {"gallery": source, "images": len(images), "recall_at_10_vs_fp32": recall_at_k(ref, cand),
           "min_cosine_vs_fp32": float(row_cosine(ref, cand).min())}
    if labels is not None:
        out |= {"knn_top1_fp32": knn_top1(ref, labels), "knn_top1_int8": knn_top1(cand, labels)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="MODEL as for 'ascl export onnx'; default: seed-0 initialised resnet18")
    p.add_argument("--gallery", default=None, help="labelled images (folder or .tar.gz); default: CIFAR-10 copy, else digits")
    p.add_argument("--gallery-size", type=int, default=1000, help="images for recall@10 and kNN top-1")
    p.add_argument("--calibration-size", type=int, default=256, help="int8 calibration images (taken after the gallery)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64], help="CPU batch sizes")
    p.add_argument("--gpu-batch", type=int, default=1024, help="GPU batch size")
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per engine and batch size")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0: all cores)")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/inference-<device>-<time>.json)")
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    from ascl.export.golden import init_encoder
    from ascl.export.runtime import cuda_driver_present

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    if args.model:
        from ascl.export.model_source import load_model

        encoder, model_desc = load_model(args.model).encoder, args.model
    else:
        encoder, model_desc = init_encoder(), "seed-0 initialised resnet18 (untrained: no trained default model yet)"
    size = encoder.image_size
    source, gallery, labels = load_gallery(args.gallery, size, args.gallery_size)
    _, calib, _ = load_gallery(args.gallery, size, args.calibration_size, offset=len(gallery))
    print(f"model: {model_desc}; gallery: {source} ({len(gallery)} images); threads {threads}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = build_onnx(encoder, Path(tmp), calib)
        cpu = ["CPUExecutionProvider"]
        engines = {"torch_eager_fp32": torch_engines(encoder, "cpu")["torch_eager_fp32"],
                   "ort_fp32": ort_engine(fp32_path, cpu, threads), "ort_int8": ort_engine(int8_path, cpu, threads)}
        results: list[dict] = []
        for batch in args.batch_sizes:
            results += time_batch(engines, gallery, batch, args.seconds, lambda: None, "cpu")
        recall = recall_section(engines["ort_fp32"], engines["ort_int8"], source, gallery, labels)
        print(f"int8 vs fp32: {recall}", flush=True)
        gpu = torch.cuda.is_available()
        if gpu:
            results += gpu_section(encoder, fp32_path, gallery, args.gpu_batch, args.seconds, ort)

    largest = max(args.batch_sizes)
    at = {r["engine"]: r["vs_eager"] for r in results if r["device"] == "cpu" and r["batch"] == largest}
    goals = {
        f"ort_fp32_vs_eager_at_batch_{largest}": {"value": at["ort_fp32"], "goal": GOALS["ort_fp32_vs_eager"]},
        f"ort_int8_vs_eager_at_batch_{largest}": {"value": at["ort_int8"], "goal": GOALS["ort_int8_vs_eager"]},
        "int8_recall_at_10": {"value": recall["recall_at_10_vs_fp32"], "goal": GOALS["int8_recall_at_10"]},
    }
    gpu_rows = [r for r in results if r["device"] == "cuda"]
    if gpu_rows:
        goals["gpu_best_vs_eager_fp32"] = {"value": max(r["vs_eager"] for r in gpu_rows), "goal": GOALS["gpu_best_vs_eager"]}
    for g in goals.values():
        g["met"] = bool(g["value"] >= g["goal"])
    report = {
        "benchmark": "inference",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"host": platform.node(), "cpu": machine.cpu_name(), "cores": os.cpu_count(), "threads": threads,
                    "gpu": torch.cuda.get_device_name(0) if gpu else None, "cuda_driver": cuda_driver_present(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()},
        "model": model_desc, "image_size": size, "results": results, "int8_quality": recall, "goals": goals,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"inference-{'gpu' if gpu else 'cpu'}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    from ascl.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(goals, indent=2))
    print(f"wrote {out}")
    return 0


def gpu_section(encoder, fp32_path: Path, gallery: np.ndarray, batch: int, seconds: float, ort) -> list[dict]:  # type: ignore[no-untyped-def]
    """Eager fp32, bf16 + channels_last, torch.compile and ONNX Runtime CUDA / TensorRT at one big batch."""
    import torch

    from ascl.export.runtime import resolve_providers

    engines = torch_engines(encoder, "cuda")
    available = ort.get_available_providers()
    for short, name in (("cuda", "ort_cuda_fp32"), ("tensorrt", "ort_tensorrt_fp16")):
        try:
            providers = resolve_providers([short], image_size=encoder.image_size)
            if short == "tensorrt":
                providers = [(providers[0][0], {**providers[0][1], "trt_fp16_enable": "True"})]  # type: ignore[index]
            engines[name] = ort_engine(fp32_path, [*providers, "CPUExecutionProvider"], 0)
        except Exception as exc:  # a provider that cannot start here is reported, not fatal
            print(f"skipping {name}: {exc} (available: {available})", flush=True)
    return time_batch(engines, gallery, batch, seconds, torch.cuda.synchronize, "cuda")


if __name__ == "__main__":
    sys.exit(main())
