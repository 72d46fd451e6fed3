"""Inference throughput and latency: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8.

All engines run in one process on the same images, interleaved call by call at each batch size
(so a noisy neighbour on a shared machine slows all of them alike), and the ratios to eager are
computed from those same measurements. On a GPU it adds eager fp32, bf16 autocast +
channels_last, torch.compile and ONNX Runtime CUDA / TensorRT at a large batch. Inputs are
uint8 NHWC numpy arrays on the host for every engine (the serving contract), so host-to-device
copies are included on a GPU. Also measures int8 recall@10 vs fp32 on a labelled gallery.

    python benchmarks/inference.py                       # CPU, deterministic-init resnet18
    python benchmarks/inference.py --model runs/x        # any MODEL that 'ascl export onnx' takes
    python benchmarks/inference.py --gpu-only            # GPU section alone (benchmarks/device_gpu.sh)

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
    """scikit-learn's digits as uint8 RGB at ``size`` px, when no CIFAR-10 copy is around; classes
    interleaved, so that any leading slice (gallery, then calibration) holds every class."""
    from ascl.image_sources import render_digits

    digits = render_digits(size)
    keep = np.stack([np.flatnonzero(digits.labels == c)[:per_class] for c in range(10)]).T.ravel()  # classes interleaved
    return "sklearn digits", digits.images[keep], digits.labels[keep]


def load_gallery(source: str | None, size: int, count: int, offset: int = 0) -> tuple[str, np.ndarray, np.ndarray | None]:
    from ascl.export.image_sets import load_image_set
    from ascl.image_sources import default_cifar_tar

    chosen = source or default_cifar_tar()
    if chosen is None or chosen == "digits":
        name, images, labels = digits_gallery(size)
        return name, images[offset : offset + count], labels[offset : offset + count]
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


def torch_engines(encoder, device: str, *, fast: bool = False, compile: bool = True) -> dict[str, Engine]:  # type: ignore[no-untyped-def]
    """PyTorch engines on ``device``: eager fp32 always; with ``fast`` also bf16 autocast +
    channels_last, and (``compile``) that model under ``torch.compile`` with Inductor's
    freezing (weights as constants: BatchNorm folded into the convs, layouts fixed once)."""
    import torch

    model = encoder.to(device).eval()

    def eager(images: np.ndarray) -> object:
        with torch.inference_mode():
            return model.embed_uint8(torch.from_numpy(images).to(device)).cpu()

    engines: dict[str, Engine] = {"torch_eager_fp32": eager}
    if fast:
        import copy

        fast_model = copy.deepcopy(model).to(memory_format=torch.channels_last)

        def bf16(images: np.ndarray, net: Callable = fast_model) -> object:  # type: ignore[type-arg]
            with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
                x = fast_model.normalize_uint8(torch.from_numpy(images).to(device))  # [N, 3, S, S] float32
                return net(x.contiguous(memory_format=torch.channels_last)).float().cpu()

        engines["torch_bf16_channels_last"] = bf16
        if compile:
            compiled = torch.compile(fast_model, options={"freezing": True})
            engines["torch_compile_bf16_channels_last"] = lambda images: bf16(images, compiled)
    return engines


def working_engines(engines: dict[str, Engine], images: np.ndarray, sync: Callable[[], None]
                    ) -> tuple[dict[str, Engine], dict[str, float]]:
    """The engines whose first call succeeds (compilation happens here), and each one's lowest
    cosine similarity to eager fp32 on that call. The others are reported and dropped, so one
    engine that cannot run here does not lose the others' figures."""
    from ascl.export.parity import row_cosine

    kept: dict[str, Engine] = {}
    cosine: dict[str, float] = {}
    reference: np.ndarray | None = None
    for name, run in engines.items():  # torch_eager_fp32 first
        start = time.perf_counter()
        try:
            out = np.asarray(run(images), dtype=np.float32)  # [N, D]
            sync()
        except Exception as exc:  # an optional engine failing is a finding, not a crash
            if name == "torch_eager_fp32":
                raise
            print(f"skipping {name}: first call failed ({type(exc).__name__}: {exc})", flush=True)
            continue
        reference = out if reference is None else reference
        cosine[name] = float(row_cosine(reference, out).min())
        print(f"{name}: first call {time.perf_counter() - start:.1f} s, min cosine vs eager fp32 {cosine[name]:.5f}",
              flush=True)
        kept[name] = run
    return kept, cosine


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


def flops_per_image(encoder) -> float:  # type: ignore[no-untyped-def]
    """Floating-point operations of one embedding (convolutions and matmuls, as PyTorch counts
    them: a multiply-add is 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    s = encoder.image_size
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder.embed_uint8(torch.zeros(1, s, s, 3, dtype=torch.uint8))
    return float(counter.get_total_flops())


def _best_rate(run: Callable[[], object], ops: float, seconds: float) -> float:
    """Best ops/s over short timed bursts of ``run`` (after one warm-up call)."""
    run()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        run()
        best = max(best, ops / (time.perf_counter() - start))
    return best


def _gemm_rates(n: int, threads: int, seconds: float) -> dict[str, float]:
    """Best ops/s of one n x n product: PyTorch fp32, ONNX Runtime fp32 and int8."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def session(op: str, a_type: int, b: np.ndarray, out_type: int) -> Any:
        graph = helper.make_graph(
            [helper.make_node(op, ["A", "B"], ["C"])], "gemm",
            [helper.make_tensor_value_info("A", a_type, [n, n])], [helper.make_tensor_value_info("C", out_type, [n, n])],
            [numpy_helper.from_array(b, "B")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    f32 = session("MatMul", TensorProto.FLOAT, rng.standard_normal((n, n), dtype=np.float32), TensorProto.FLOAT)
    x32 = rng.standard_normal((n, n), dtype=np.float32)
    i8 = session("MatMulInteger", TensorProto.UINT8, rng.integers(-128, 128, (n, n), dtype=np.int8), TensorProto.INT32)
    x8 = rng.integers(0, 256, (n, n), dtype=np.uint8)
    ops = 2 * n**3
    return {"fp32_torch_gflops": _best_rate(lambda: a32 @ b32, ops, seconds) / 1e9,
            "fp32_ort_gflops": _best_rate(lambda: f32.run(None, {"A": x32}), ops, seconds) / 1e9,
            "int8_gops": _best_rate(lambda: i8.run(None, {"A": x8}), ops, seconds) / 1e9}


def gemm_roofs(threads: int, sizes: tuple[int, ...] = (1024, 1536), seconds: float = 1.0) -> dict[str, float]:
    """What this CPU's dense kernels reach, in G(FL)OP/s, measured in the same run as the engines.

    fp32: the better of PyTorch's and ONNX Runtime's sgemm. int8: ONNX Runtime's MatMulInteger
    (uint8 x int8, the MLAS kernels its int8 convolutions run on). Each is the best burst over
    ``sizes``: a roof is an upper bound, and on a shared machine a single burst reads low. A
    convolution engine cannot do much better than these, so they bound what any engine can
    gain over eager here.
    """
    best = merge_roofs(*(_gemm_rates(n, threads, seconds) for n in sizes))
    return {"fp32_gflops": max(best["fp32_torch_gflops"], best["fp32_ort_gflops"]), **best}


def merge_roofs(*measured: dict[str, float]) -> dict[str, float]:
    """The highest reading of each roof (taken before and after the engines' timings)."""
    return {k: max(m[k] for m in measured) for k in measured[0]}


def roofline(rows: list[dict[str, Any]], flops: float, roofs: dict[str, float]) -> dict[str, Any]:
    """Per CPU batch size: what eager reaches of the fp32 roof, and the largest ratio to eager
    that an fp32 or an int8 engine could show on this CPU (its roof over eager's rate; for fp32,
    the best fp32 engine measured if it beat the sgemm roof)."""
    out: dict[str, Any] = {"flops_per_image": flops, **{k: round(v, 1) for k, v in roofs.items()}, "by_batch": {}}
    for row in rows:
        row["gflop_per_s"] = round(row["images_per_s"] * flops / 1e9, 1)
    for batch in sorted({r["batch"] for r in rows}):
        at = {r["engine"]: r["gflop_per_s"] for r in rows if r["batch"] == batch}
        eager = at["torch_eager_fp32"]
        fp32_roof = max(roofs["fp32_gflops"], at.get("ort_fp32", 0.0))
        out["by_batch"][str(batch)] = {
            "eager_share_of_fp32_roof": round(eager / roofs["fp32_gflops"], 3),
            "fp32_ceiling_vs_eager": round(fp32_roof / eager, 2),
            "int8_ceiling_vs_eager": round(max(roofs["int8_gops"], at.get("ort_int8", 0.0)) / eager, 2),
        }
    return out


def recall_section(fp32: Engine, int8: Engine, source: str, images: np.ndarray, labels: np.ndarray | None) -> dict:
    from ascl.export.parity import embed_in_batches, knn_top1, recall_at_k, row_cosine

    ref = embed_in_batches(fp32, images, 64)  # type: ignore[arg-type]
    cand = embed_in_batches(int8, images, 64)  # type: ignore[arg-type]
    out = {"gallery": source, "images": len(images), "recall_at_10_vs_fp32": recall_at_k(ref, cand),
           "min_cosine_vs_fp32": float(row_cosine(ref, cand).min())}
    if labels is not None:
        out |= {"knn_top1_fp32": knn_top1(ref, labels), "knn_top1_int8": knn_top1(cand, labels)}
    return out


def cpu_section(encoder, fp32_path: Path, int8_path: Path,  # type: ignore[no-untyped-def]
                gallery_set: tuple[str, np.ndarray, np.ndarray | None], args: argparse.Namespace, threads: int
                ) -> tuple[list[dict], dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """Eager vs ONNX Runtime fp32 vs int8 at each CPU batch size, the roofline beside them, and
    int8 quality; returns (rows, roofline, int8 quality, goals)."""
    source, gallery, labels = gallery_set
    cpu = ["CPUExecutionProvider"]
    engines = {"torch_eager_fp32": torch_engines(encoder, "cpu")["torch_eager_fp32"],
               "ort_fp32": ort_engine(fp32_path, cpu, threads), "ort_int8": ort_engine(int8_path, cpu, threads)}
    flops = flops_per_image(encoder)
    roofs_before = gemm_roofs(threads, seconds=args.roof_seconds)
    results: list[dict] = []
    for batch in args.batch_sizes:
        results += time_batch(engines, gallery, batch, args.seconds, lambda: None, "cpu")
    roofs = merge_roofs(roofs_before, gemm_roofs(threads, seconds=args.roof_seconds))
    roof = roofline(results, flops, roofs)
    print(f"roofline: {flops / 1e9:.2f} GFLOP per image; dense kernels here: fp32 {roofs['fp32_gflops']:.0f} "
          f"GFLOP/s, int8 {roofs['int8_gops']:.0f} GOP/s (SIMD: {', '.join(machine.cpu_simd_flags()) or '?'})")
    for batch, r in roof["by_batch"].items():
        print(f"  batch {batch:>4s}: eager reaches {100 * r['eager_share_of_fp32_roof']:.0f}% of the fp32 roof; "
              f"the most any engine can gain over eager here: fp32 x{r['fp32_ceiling_vs_eager']:.2f}, "
              f"int8 x{r['int8_ceiling_vs_eager']:.2f}", flush=True)
    recall = recall_section(engines["ort_fp32"], engines["ort_int8"], source, gallery, labels)
    print(f"int8 vs fp32: {recall}", flush=True)
    largest = max(args.batch_sizes)
    at = {r["engine"]: r["vs_eager"] for r in results if r["batch"] == largest}
    ceiling = roof["by_batch"][str(largest)]
    goals = {
        f"ort_fp32_vs_eager_at_batch_{largest}": {"value": at["ort_fp32"], "goal": GOALS["ort_fp32_vs_eager"],
                                                 "ceiling_on_this_cpu": ceiling["fp32_ceiling_vs_eager"]},
        f"ort_int8_vs_eager_at_batch_{largest}": {"value": at["ort_int8"], "goal": GOALS["ort_int8_vs_eager"],
                                                 "ceiling_on_this_cpu": ceiling["int8_ceiling_vs_eager"]},
        "int8_recall_at_10": {"value": recall["recall_at_10_vs_fp32"], "goal": GOALS["int8_recall_at_10"]},
    }
    return results, roof, recall, goals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="MODEL as for 'ascl export onnx'; default: seed-0 initialised resnet18")
    p.add_argument("--gallery", default=None,
                   help="labelled images (folder, .tar.gz or 'digits'); default: the CIFAR-10 copy, else digits")
    p.add_argument("--gallery-size", type=int, default=1000, help="images for recall@10 and kNN top-1")
    p.add_argument("--calibration-size", type=int, default=256, help="int8 calibration images (taken after the gallery)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64], help="CPU batch sizes")
    p.add_argument("--gpu-batch", type=int, default=1024, help="GPU batch size")
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per engine and batch size")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0: all cores)")
    p.add_argument("--roof-seconds", type=float, default=1.0,
                   help="seconds per dense-kernel roof reading (fp32 torch, fp32 and int8 ONNX Runtime; two sizes, "
                        "before and after the timings)")
    p.add_argument("--gpu-only", action="store_true",
                   help="only the GPU section (no CPU timings, no int8 model): for a time-boxed device run")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the GPU section")
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
    print(f"model: {model_desc}; gallery: {source} ({len(gallery)} images); threads {threads}", flush=True)
    gpu = torch.cuda.is_available()
    if args.gpu_only and not gpu:
        p.error("--gpu-only needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")

    results: list[dict] = []
    recall: dict[str, Any] | None = None
    roof: dict[str, Any] | None = None
    goals: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path: Path | None = None
        if args.gpu_only:  # the ONNX model only feeds ONNX Runtime's GPU providers: its failure is not fatal
            try:
                from ascl.export.onnx_export import encoder_to_onnx

                onnx_file = Path(tmp) / "encoder.onnx"
                onnx_file.write_bytes(encoder_to_onnx(encoder).SerializeToString())
                fp32_path = onnx_file
            except Exception as exc:
                print(f"ONNX export failed, ONNX Runtime engines left out: {type(exc).__name__}: {exc}", flush=True)
        else:
            _, calib, _ = load_gallery(args.gallery, size, args.calibration_size, offset=len(gallery))
            fp32_path, int8_path = build_onnx(encoder, Path(tmp), calib)
            results, roof, recall, goals = cpu_section(encoder, fp32_path, int8_path, (source, gallery, labels),
                                                       args, threads)
        if gpu:
            gpu_rows = gpu_section(encoder, fp32_path, gallery, args.gpu_batch, args.seconds, ort,
                                   compile=not args.no_compile)
            results += gpu_rows
            goals[f"gpu_best_vs_eager_fp32_at_batch_{args.gpu_batch}"] = {
                "value": max(r["vs_eager"] for r in gpu_rows), "goal": GOALS["gpu_best_vs_eager"]}
    for g in goals.values():
        g["met"] = bool(g["value"] >= g["goal"])
    report = {
        "benchmark": "inference",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"host": platform.node(), "cpu": machine.cpu_name(), "cores": os.cpu_count(), "threads": threads,
                    "simd": machine.cpu_simd_flags(), "gpu": torch.cuda.get_device_name(0) if gpu else None,
                    "cuda_driver": cuda_driver_present(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()},
        "model": model_desc, "image_size": size, "results": results, "roofline": roof, "int8_quality": recall,
        "goals": goals,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"inference-{'gpu' if gpu else 'cpu'}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    from ascl.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(goals, indent=2))
    print(f"wrote {out}")
    return 0


def gpu_section(encoder, fp32_path: Path | None, gallery: np.ndarray, batch: int, seconds: float, ort,  # type: ignore[no-untyped-def]
                device: str = "cuda", compile: bool = True) -> list[dict]:
    """Eager fp32, bf16 + channels_last, torch.compile and ONNX Runtime CUDA / TensorRT at one big batch."""
    import torch

    from ascl.export.runtime import resolve_providers

    engines = torch_engines(encoder, device, fast=True, compile=compile)
    available = ort.get_available_providers()
    for short, name in (("cuda", "ort_cuda_fp32"), ("tensorrt", "ort_tensorrt_fp16")):
        if fp32_path is None:
            break
        try:
            providers = resolve_providers([short], image_size=encoder.image_size)
            if short == "tensorrt":
                providers = [(providers[0][0], {**providers[0][1], "trt_fp16_enable": "True"})]  # type: ignore[index]
            engines[name] = ort_engine(fp32_path, [*providers, "CPUExecutionProvider"], 0)
        except Exception as exc:  # a provider that cannot start here is reported, not fatal
            print(f"skipping {name}: {exc} (available: {available})", flush=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    images = np.ascontiguousarray(np.resize(gallery, (batch, *gallery.shape[1:])))  # [B, S, S, 3]
    kept, cosine = working_engines(engines, images, sync)
    rows = time_batch(kept, gallery, batch, seconds, sync, device)
    for row in rows:
        row["min_cosine_vs_eager"] = cosine[row["engine"]]
    return rows


if __name__ == "__main__":
    sys.exit(main())
