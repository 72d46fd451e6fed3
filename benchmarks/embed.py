"""Bulk embedding throughput: `ascl embed` (local engine, Ray engine) vs the inference engine alone.

Every figure comes from this one run, with one ONNX file (the export of --model, by default the
shipped default), one batch size and one ONNX Runtime thread count:

- engine only: ONNX Runtime fp32 embedding one batch of already decoded images over and over,
  as benchmarks/inference.py measures it (intra-op threads = cores, worker spinning off: the
  reference of the goal), and two more ways beside it: spinning on, and `ascl embed`'s own
  (one call per core at once, one intra-op thread each); `ratio_to_best_engine_only` divides by
  the best of the three;
- local: `embed_collection(engine="local")` over the source: reading the archive, sha1, decode
  and resize on a thread pool, ONNX Runtime, Parquet writes, all included;
- ray: the same through Ray Data on a local instance (started before the clock; the dataset,
  its decode tasks and the ONNX Runtime actor pool start inside the timing).

Rounds alternate: engine only, then each pipeline, then engine only again; a pipeline's ratio is
its images/s over the mean of the engine-only readings just before and after it, so that a
neighbour's load changes both alike. The record keeps the load average of every reading.

    python benchmarks/embed.py                       # full: the 50,000 images of the CIFAR-10 tar, 2 rounds
    python benchmarks/embed.py --limit 2000          # quick (start-up costs weigh more: ratios read low)
    python benchmarks/embed.py --engines local       # without Ray (pip install 'ascl-hub[scale]' for it)
    python benchmarks/embed.py --images FOLDER --model runs/x

Run it on a quiet machine (nothing else on the cores): on a shared one the absolute figures move
with the neighbours' load. Writes benchmarks/results/embed.json (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.9  # the local engine, decoding included, vs the engine alone


def engine_only(onnx: Path, images: np.ndarray, threads: int, seconds: float) -> dict[str, Any]:
    """images/s of ONNX Runtime on one batch of decoded images, three ways:

    ``inference_py``: intra-op threads = ``threads``, worker spinning off: benchmarks/inference.py's
    ORT fp32 engine, the goal's reference; ``spinning``: the same with spinning on;
    ``parallel_batches``: what ``ascl embed`` runs: ``threads`` calls at once on one session, one
    intra-op thread each. ``best``: the highest of the three (the strict reference).
    """
    import threading

    from ascl.export.runtime import OnnxEmbedder

    def timed(embedder: OnnxEmbedder, callers: int) -> float:
        embedder.embed(images)  # warm-up
        counts = [0] * callers
        start = time.perf_counter()

        def work(i: int) -> None:
            while time.perf_counter() - start < seconds or counts[i] < 3 * len(images):
                embedder.embed(images)
                counts[i] += len(images)

        workers = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(counts) / (time.perf_counter() - start)

    cpu = ["CPUExecutionProvider"]
    out: dict[str, Any] = {
        "inference_py": timed(OnnxEmbedder(onnx, providers=cpu, threads=threads, spinning=False), 1),
        "spinning": timed(OnnxEmbedder(onnx, providers=cpu, threads=threads, spinning=True), 1),
        "parallel_batches": timed(OnnxEmbedder(onnx, providers=cpu, threads=1, spinning=False), threads),
    }
    out["best"] = max(out.values())
    out["load_average"] = os.getloadavg()[0]
    return out


def run_pipeline(engine: str, images: str, onnx: Path, work: Path, args: argparse.Namespace,
                 threads: int) -> tuple[dict[str, Any], Path]:
    from ascl.serving.collections.embed import RayOptions, embed_collection

    out = work / f"{engine}-{time.monotonic_ns()}"
    options = RayOptions(actors=args.actors, threads=threads, num_cpus_per_actor=1.0, decode_cpus=1.0)
    report = embed_collection(images, out, model=str(onnx), batch_size=args.batch_size, limit=args.limit,
                              engine=engine, threads=threads, ray=options, progress=False)
    positions = report.added + report.errors_added
    return {"engine": engine, "images": positions, "seconds": round(report.seconds, 2),
            "images_per_s": positions / report.seconds, "load_average": os.getloadavg()[0]}, out


def same_output(a: Path, b: Path) -> dict[str, Any]:
    from ascl.serving.collections.parquet_set import embeddings_of, read_table

    x, y = read_table(a), read_table(b)
    same_rows = all(x.column(c).to_pylist() == y.column(c).to_pylist()
                    for c in ("id", "path", "label", "sha1", "size", "width", "height"))
    diff = float(np.abs(embeddings_of(x) - embeddings_of(y)).max()) if x.num_rows == y.num_rows else float("inf")
    return {"same_rows": same_rows, "max_abs_embedding_difference": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="MODEL as for 'ascl embed' (default: the shipped default)")
    p.add_argument("--images", default="cifar10-offline", help="image source (default: the CIFAR-10 tar)")
    p.add_argument("--limit", type=int, default=None, help="images per pipeline run (default: the whole source)")
    p.add_argument("--batch-size", type=int, default=256, help="images per ONNX Runtime call, everywhere")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    p.add_argument("--rounds", type=int, default=2, help="pipeline runs per engine, alternating")
    p.add_argument("--engine-seconds", type=float, default=5.0, help="seconds per engine-only reading")
    p.add_argument("--engines", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    p.add_argument("--actors", type=int, default=1, help="Ray: ONNX Runtime actors (one machine: 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "embed.json"), help="result JSON")
    args = p.parse_args(argv)

    import onnxruntime as ort
    import pyarrow

    from ascl.export.cache import cached_onnx
    from ascl.export.identity import model_identity
    from ascl.image_sources import iter_images
    from ascl.models import resolve_model

    threads = args.threads or len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    ref = resolve_model(args.model)
    onnx, _ = cached_onnx(ref)
    identity = model_identity(onnx, ref)
    size = int(identity["image_size"] or 32)
    batch = np.stack([item.decode(size) for item in iter_images(args.images, args.batch_size)])  # [B, S, S, 3]
    print(f"model {identity['name']} ({identity['weights']}, {identity['dim']}-d); source {args.images}; "
          f"batch {args.batch_size}; ONNX Runtime threads {threads}; SIMD {', '.join(machine.cpu_simd_flags())}",
          flush=True)

    ray_version = None
    if "ray" in args.engines:
        import ray

        ray_version = ray.__version__
        ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    readings: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    outputs: dict[str, Path] = {}
    work = Path(tempfile.mkdtemp(prefix="ascl-bench-embed-"))
    try:
        readings.append(engine_only(onnx, batch, threads, args.engine_seconds))
        for rnd in range(args.rounds):
            for engine in args.engines:
                row, out = run_pipeline(engine, args.images, onnx, work, args, threads)
                readings.append(engine_only(onnx, batch, threads, args.engine_seconds))
                reference = (readings[-2]["inference_py"] + readings[-1]["inference_py"]) / 2
                best = (readings[-2]["best"] + readings[-1]["best"]) / 2
                row |= {"round": rnd, "engine_only_images_per_s": round(reference, 1),
                        "ratio_to_engine_only": round(row["images_per_s"] / reference, 3),
                        "best_engine_only_images_per_s": round(best, 1),
                        "ratio_to_best_engine_only": round(row["images_per_s"] / best, 3)}
                row["images_per_s"] = round(row["images_per_s"], 1)
                runs.append(row)
                print(f"round {rnd} {engine:5s}: {row['images_per_s']:7.1f} images/s ({row['images']} in "
                      f"{row['seconds']} s), engine only {reference:7.1f} -> x{row['ratio_to_engine_only']:.3f} "
                      f"(best engine-only configuration {best:7.1f} -> x{row['ratio_to_best_engine_only']:.3f}); "
                      f"load {row['load_average']:.2f}", flush=True)
                if engine in outputs:
                    shutil.rmtree(out, ignore_errors=True)
                else:
                    outputs[engine] = out
        check = same_output(outputs["local"], outputs["ray"]) if {"local", "ray"} <= set(outputs) else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if "ray" in args.engines:
            import ray

            ray.shutdown()

    summary: dict[str, Any] = {}
    for engine in args.engines:
        ratios = [r["ratio_to_engine_only"] for r in runs if r["engine"] == engine]
        strict = [r["ratio_to_best_engine_only"] for r in runs if r["engine"] == engine]
        rates = [r["images_per_s"] for r in runs if r["engine"] == engine]
        summary[engine] = {"median_ratio": statistics.median(ratios), "best_ratio": max(ratios),
                           "median_ratio_to_best_engine_only": statistics.median(strict),
                           "median_images_per_s": statistics.median(rates), "best_images_per_s": max(rates)}
    goal = None
    if "local" in summary:
        goal = {"local_ratio_to_engine_only": summary["local"]["median_ratio"], "goal": GOAL,
                "met": summary["local"]["median_ratio"] >= GOAL}
    report = {
        "benchmark": "embed",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"host": platform.node(), "cpu": machine.cpu_name(), "cores": os.cpu_count(), "threads": threads,
                    "simd": machine.cpu_simd_flags(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "versions": {"onnxruntime": ort.__version__, "pyarrow": pyarrow.__version__, "ray": ray_version,
                     "python": platform.python_version()},
        "model": {k: identity[k] for k in ("name", "weights", "dim", "precision", "image_size")},
        "source": args.images, "limit": args.limit, "batch_size": args.batch_size,
        "engine_only_readings": readings, "runs": runs, "summary": summary, "local_vs_ray_output": check,
        "goal": goal,
    }
    from ascl.atomic import atomic_write_text

    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps({"summary": summary, "goal": goal, "local_vs_ray_output": check}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
