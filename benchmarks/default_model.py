"""What a user of the shipped default model gets: search quality of the demo gallery, fp32 and int8.

The demo gallery is what ``ascl up`` indexes by default (the first 200 images of every class of
the Imagenette copy when it is beside the checkout, else of the CIFAR-10 copy; all in the
training split). The queries are images no model of this project was trained on and that are
not in the gallery: the held-out validation split of the same set (the last 10% of every
class), up to 100 per class. Every image is decoded at the model's own input size. For each
model (``--model``, and for comparison ``--compare``, by default the same architecture at a
seeded random initialisation) it reports:

- precision@10: the share of each query's 10 nearest gallery images that show the query's
  class, through the exported ONNX graph (fp32) and its calibrated int8 copy;
- int8 recall@10 vs fp32: how many of each gallery image's 10 nearest neighbours under fp32
  the int8 graph keeps (the quantity ``ascl serve --precision int8`` will be checked on).

    python benchmarks/default_model.py                       # the shipped default
    python benchmarks/default_model.py --model runs/NAME --queries-per-class 20   # quicker

Writes ``benchmarks/results/default_model.json`` (machine, command, every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import RANDOM_TWIN, load_benchmark_encoder  # noqa: E402


def precision_at_k(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray,
                   k: int = 10) -> float:
    """Mean share of each query's k nearest gallery rows (cosine) with the query's label."""
    sim = queries.astype(np.float64) @ gallery.astype(np.float64).T  # [Q, G]
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # [Q, k]
    return float((gallery_labels[top] == query_labels[:, None]).mean())


def evaluate(spec: str, gallery_root: Path, data: str, queries_per_class: int, work: Path,
             twin_of: Any = None) -> tuple[dict[str, Any], Any]:
    """Every figure of one model, its images decoded at its own input size; returns (row, encoder)."""
    import onnx

    from ascl.export.image_sets import load_image_set
    from ascl.export.onnx_export import encoder_to_onnx
    from ascl.export.parity import embed_in_batches, recall_at_k, row_cosine
    from ascl.export.quantize import quantize_int8
    from ascl.export.runtime import OnnxEmbedder
    from ascl.training.data import load_split

    encoder = load_benchmark_encoder(spec, twin_of)
    size = encoder.image_size
    gallery = load_image_set(gallery_root, size, count=10**6)
    val = load_split(data, "val", image_size=size)
    if gallery.labels is None or list(val.classes) != list(gallery.classes):
        raise SystemExit(f"the gallery's classes {gallery.classes} differ from the data's {val.classes}; "
                         "pass --data with the set the gallery was taken from")
    picked = np.concatenate([np.flatnonzero(val.labels == c)[:queries_per_class] for c in range(len(val.classes))])
    queries = val.take(picked)
    train = load_split(data, "train", image_size=size)
    calibration = train.images[np.linspace(len(train) // 2, len(train) - 1, 256).astype(int)]  # not in the gallery
    fp32 = encoder_to_onnx(encoder, model_name=spec)
    onnx.save_model(fp32, work / f"{encoder.width}-fp32.onnx")
    onnx.save_model(quantize_int8(fp32, calibration), work / f"{encoder.width}-int8.onnx")
    row: dict[str, Any] = {"model": spec, "arch": encoder.arch, "width": encoder.width, "stem": encoder.stem,
                           "image_size": size, "embedding_dim": encoder.embedding_dim,
                           "gallery_images": int(len(gallery.images)), "queries": int(len(picked))}
    embedded: dict[str, dict[str, np.ndarray]] = {}
    for precision in ("fp32", "int8"):
        engine = OnnxEmbedder(work / f"{encoder.width}-{precision}.onnx")
        g = embed_in_batches(engine.embed, gallery.images, 256)
        q = embed_in_batches(engine.embed, queries.images, 256)
        embedded[precision] = {"gallery": g, "queries": q}
        row[f"precision_at_10_{precision}"] = round(precision_at_k(q, queries.labels, g, gallery.labels), 4)
    row["int8_recall_at_10_vs_fp32"] = round(recall_at_k(embedded["fp32"]["gallery"], embedded["int8"]["gallery"]), 4)
    row["int8_min_cosine"] = round(float(row_cosine(embedded["fp32"]["gallery"], embedded["int8"]["gallery"]).min()), 4)
    return row, encoder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the model users get (default: the shipped default)")
    p.add_argument("--compare", default=RANDOM_TWIN,
                   help=f"a model to compare with, or '' for none (default: {RANDOM_TWIN}, the same architecture at "
                        "random initialisation; random-resnet18-w64: what ascl up served before a model shipped)")
    p.add_argument("--data", default="",
                   help="labelled data the gallery was taken from (default: imagenette-offline when the demo's "
                        "default gallery is the Imagenette copy, else cifar10-offline)")
    p.add_argument("--queries-per-class", type=int, default=100, help="held-out query images per class")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "default_model.json"))
    args = p.parse_args(argv)

    from ascl.atomic import atomic_write_text
    from ascl.cache import cache_dir
    from ascl.demo.gallery_images import resolve_gallery
    from ascl.image_sources import default_imagenette_tar

    started = time.time()
    load_before = os.getloadavg()
    demo = resolve_gallery(None, cache_dir())  # exactly what `ascl up` indexes by default
    data = args.data or ("imagenette-offline" if default_imagenette_tar() is not None else "cifar10-offline")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        row, encoder = evaluate(args.model, demo.root, data, args.queries_per_class, Path(tmp))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.compare:
            rows.append(evaluate(args.compare, demo.root, data, args.queries_per_class, Path(tmp), encoder)[0])
            print(json.dumps(rows[-1]), flush=True)
    record = {
        "benchmark": "default_model", "machine": {"cpu": machine.cpu_name(), "cpu_simd": machine.cpu_simd_flags(),
                                                  "cores": os.cpu_count()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.time() - started, 1),
        "gallery": demo.description, "gallery_images": rows[0]["gallery_images"], "data": data,
        "queries": f"{rows[0]['queries']} images of the held-out val split ({args.queries_per_class} per class at "
                   "most), neither trained on nor in the gallery",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(
            ["default_model.py", *argv]),
        "models": rows,
    }
    atomic_write_text(Path(args.out), json.dumps(record, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
