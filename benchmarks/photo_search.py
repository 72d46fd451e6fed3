"""What a photo search finds: leave-one-out precision@10 of each model on held-out labelled image sets.

A user who searches photos gets, for each query, the 10 most similar other images. For every
labelled set here, each image is a query for all the others (leave-one-out) and precision@10 is
the share of its 10 nearest neighbours (cosine of the embeddings) with the query's label. The
sets are parts no model of this project trained on:

- ``imagenette-offline`` val: the last 10% of every class of the Imagenette copy (real photos,
  160 px, 10 classes), held out of the photo model's training;
- ``cifar10-offline`` val: the last 10% of every class of the CIFAR-10 copy (32-px photos of
  other kinds: vehicles and animals), held out of the CIFAR model's training.

Each model embeds every image at its own input size by the serving rule (``ascl.images``:
centred square, resized), through PyTorch on the CPU. Each model is compared with the same
architecture at random initialisation (``random:0`` at its width, stem and size): the baseline
any trained model must beat by far.

    python benchmarks/photo_search.py                                   # the shipped models
    python benchmarks/photo_search.py --model runs/NAME --set imagenette-offline

Writes ``benchmarks/results/photo_search.json`` (machine, command, every figure) and a bar chart.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETS = ("imagenette-offline", "cifar10-offline")
DEFAULT_MODELS = ("ascl-resnet18w16-imagenette-cpu", "ascl-resnet18w16-cifar10-cpu")


def leave_one_out_precision(embeddings: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's k nearest other rows (cosine; unit-norm rows) with its label."""
    sim = embeddings.astype(np.float64) @ embeddings.astype(np.float64).T  # [N, N]
    np.fill_diagonal(sim, -np.inf)  # a query never finds itself
    top = np.argpartition(-sim, k, axis=1)[:, :k]  # [N, k] the k nearest, any order
    return float((labels[top] == labels[:, None]).mean())


def embed(encoder: Any, spec: str, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm embeddings [N, D] and labels [N] of the held-out split of ``spec`` at the encoder's size."""
    import torch

    from ascl.training.data import load_split
    from ascl.training.knn import embed_images

    data = load_split(spec, "val", image_size=encoder.image_size, val_fraction=val_fraction)
    emb = embed_images(encoder, torch.from_numpy(data.images), 256, torch.device("cpu"))
    return emb.numpy(), data.labels


def random_twin(encoder: Any) -> Any:
    """The same architecture, width, stem and input size at a seeded random initialisation."""
    import torch

    from ascl.encoder import Encoder

    torch.manual_seed(0)
    return Encoder(arch=encoder.arch, stem=encoder.stem, image_size=encoder.image_size, width=encoder.width,
                   mean=encoder.mean, std=encoder.std).eval()


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ascl.training.metrics import save_png

    sets = record["sets"]
    rows = record["models"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / (2 * len(rows))
    for i, row in enumerate(rows):
        for j, (key, hatch) in enumerate((("trained", ""), ("random_init", "//"))):
            xs = [s + (2 * i + j - len(rows) + 0.5) * width for s in range(len(sets))]
            values = [100 * row["precision_at_10"][name][key] for name in sets]
            label = row["model"] if key == "trained" else f"{row['model']} (random init)"
            ax.bar(xs, values, width, label=label, hatch=hatch, alpha=0.9 if key == "trained" else 0.45,
                   color=f"C{i}")
    ax.set_xticks(range(len(sets)), [f"{s} (held out)" for s in sets])
    ax.set_ylabel("precision@10, leave-one-out (%)")
    ax.set_title("What a search finds: share of the top 10 of the query's kind")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[],
                   help=f"a model spec (repeatable; default: {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--set", action="append", default=[], dest="sets",
                   help=f"a labelled image source whose held-out part is searched (repeatable; default: "
                        f"{', '.join(DEFAULT_SETS)})")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of every class (default: 0.1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "photo_search.json"))
    args = p.parse_args(argv)

    import torch

    from ascl.atomic import atomic_write_text
    from ascl.models import load_encoder

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    started, load_before = time.time(), os.getloadavg()
    sets = args.sets or list(DEFAULT_SETS)
    rows = []
    for spec in args.model or list(DEFAULT_MODELS):
        encoder = load_encoder(spec).eval()
        twin = random_twin(encoder)
        row: dict[str, Any] = {"model": spec, "arch": encoder.arch, "width": encoder.width, "stem": encoder.stem,
                               "image_size": encoder.image_size, "precision_at_10": {}}
        for name in sets:
            result = {}
            for key, model in (("trained", encoder), ("random_init", twin)):
                emb, labels = embed(model, name, args.val_fraction)
                result[key] = round(leave_one_out_precision(emb, labels), 4)
            result["images"] = int(len(labels))
            row["precision_at_10"][name] = result
            print(f"{spec} on {name} held out ({result['images']} images): precision@10 "
                  f"{100 * result['trained']:.1f}% (random init {100 * result['random_init']:.1f}%)", flush=True)
        rows.append(row)
    record = {
        "benchmark": "photo_search",
        "machine": {"cpu": machine.cpu_name(), "cpu_simd": machine.cpu_simd_flags(), "cores": os.cpu_count()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.time() - started, 1),
        "protocol": "leave-one-out precision@10 (cosine) over the held-out part (last val_fraction of every class)",
        "val_fraction": args.val_fraction, "sets": sets,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(
            ["photo_search.py", *argv]),
        "models": rows,
    }
    out = Path(args.out)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    plot(record, out.with_suffix(".png"))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
