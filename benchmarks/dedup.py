"""Precision and recall of ``ascl dedup`` on planted near-duplicates of CIFAR-10 images.

N images are drawn at random from the offline CIFAR-10 copy (through ``ascl.image_sources``);
for a random subset of them, one copy each is planted, the subset split evenly over the
transformations below. Everything is written as files (random names, so the order of the
folder says nothing) and run through the library path of ``ascl dedup IMAGES`` (embedding with
the exported model, then FAISS range search and the anchored grouping) at every threshold.

  jpeg          re-encoded as JPEG, quality 50-70
  png           re-encoded as PNG (the decoded pixels, losslessly)
  resize        scaled down to 0.5-0.75x and back up (bilinear), PNG
  crop          centre crop of 90-95% of the side, PNG (the decoder scales it back to the model's size)
  crop+jpeg     crop, then JPEG 50-70
  resize+jpeg   resize, then JPEG 50-70
  all           resize, crop, then JPEG 50-70

Pairs: a found pair is two images in one group; a planted pair is an original and its copy.
Precision = planted pairs found / pairs found; recall = planted pairs found / planted pairs;
per transformation over the pairs that hold a copy of that kind. A found pair that is not
planted counts as a false positive, even when the two images are CIFAR's own near-duplicates
(the same photo shifted, re-cropped or re-coloured: CIFAR-10 has many). Pixel differences do
not tell those apart from look-alikes at 32 px, so ``dedup_false_pairs.png`` shows the false
pairs at the recommended threshold side by side, to be judged by eye (benchmarks/README.md
says what was seen). The recommended threshold is the highest whose F1 is within
``F1_SLACK`` of the best (precision first when it costs next to nothing: ``--drop`` deletes).

    python benchmarks/dedup.py                          # 2,000 images + 700 copies, shipped default
    python benchmarks/dedup.py --n 200 --planted 70 --scale 0 --out /tmp/r   # tiny, for CI

Writes ``benchmarks/results/dedup.json``, ``dedup.png`` and ``dedup_false_pairs.png`` (machine, load
average, every figure).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("jpeg", "png", "resize", "crop", "crop+jpeg", "resize+jpeg", "all")
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
F1_SLACK = 0.005


def transform(image: object, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """(encoded bytes, suffix) of a planted copy of the PIL ``image``."""
    from PIL import Image

    assert isinstance(image, Image.Image)
    out = image
    steps = {"all": ("resize", "crop", "jpeg")}.get(kind, tuple(kind.split("+")))
    for step in steps:
        w, h = out.size
        if step == "resize":
            f = rng.uniform(0.5, 0.75)
            small = out.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BILINEAR)
            out = small.resize((w, h), Image.Resampling.BILINEAR)
        elif step == "crop":
            c = rng.uniform(0.90, 0.95)
            cw, ch = max(1, round(w * c)), max(1, round(h * c))
            left, top = (w - cw) // 2, (h - ch) // 2
            out = out.crop((left, top, left + cw, top + ch))
    buf = io.BytesIO()
    if "jpeg" in steps:
        out.save(buf, format="JPEG", quality=int(rng.integers(50, 71)))
        return buf.getvalue(), ".jpg"
    out.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def plant(data: str, n: int, planted: int, seed: int, folder: Path) -> dict[str, tuple[int, str]]:
    """Write n originals and their planted copies into ``folder``; file name -> (family, kind)."""
    from PIL import Image

    from ascl.image_sources import iter_images

    rng = np.random.default_rng(seed)
    items = list(iter_images(data))
    chosen = rng.choice(len(items), size=min(n, len(items)), replace=False)
    copies = rng.choice(len(chosen), size=min(planted, len(chosen)), replace=False)
    kind_of = {int(c): KINDS[j % len(KINDS)] for j, c in enumerate(copies)}
    names = rng.permutation(len(chosen) + len(copies))  # random file names: the folder's order is random
    truth: dict[str, tuple[int, str]] = {}
    k = 0
    for family, index in enumerate(chosen.tolist()):
        original = items[index].read()
        name = f"{names[k]:06d}{Path(items[index].path).suffix.lower() or '.jpg'}"
        (folder / name).write_bytes(original)
        truth[name] = (family, "original")
        k += 1
        if family in kind_of:
            kind = kind_of[family]
            pil = Image.open(io.BytesIO(original)).convert("RGB")
            data_bytes, suffix = transform(pil, kind, rng)
            name = f"{names[k]:06d}{suffix}"
            (folder / name).write_bytes(data_bytes)
            truth[name] = (family, kind)
            k += 1
    return truth


def pair_metrics(groups: list[list[int]], family: np.ndarray, kind: list[str],
                 planted_pairs: dict[str, int]) -> dict[str, object]:
    """Pair and group precision/recall over ``groups`` (rows), overall and per kind of copy."""
    found = [(a, b) for g in groups for x, a in enumerate(g) for b in g[x + 1:]]
    hit = [family[a] == family[b] for a, b in found]
    per_kind: dict[str, dict[str, float | int | None]] = {}
    for k in KINDS:
        touching = [h for (a, b), h in zip(found, hit, strict=True) if kind[a] == k or kind[b] == k]
        got = sum(touching)
        per_kind[k] = {"planted": planted_pairs[k], "found_planted": int(got), "found_with_this_kind": len(touching),
                       "recall": got / planted_pairs[k] if planted_pairs[k] else None,
                       "precision": got / len(touching) if touching else None}
    tp, total_planted = int(sum(hit)), sum(planted_pairs.values())
    pure = sum(1 for g in groups if len({int(family[i]) for i in g}) == 1)
    precision = tp / len(found) if found else None
    recall = tp / total_planted if total_planted else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return {"pairs_found": len(found), "planted_found": tp, "planted": total_planted,
            "precision": precision, "recall": recall, "f1": f1, "groups": len(groups),
            "group_precision": pure / len(groups) if groups else None, "per_kind": per_kind,
            "false_pairs": [(a, b) for (a, b), h in zip(found, hit, strict=True) if not h]}


def scale_timing(n: int, dim: int, threshold: float) -> dict[str, float]:
    """Seconds to group ``n`` random unit vectors (few pairs: the cost is the range search itself)."""
    from ascl.serving.collections.dedup import group_near_duplicates

    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    t = time.perf_counter()
    group_near_duplicates(v, threshold)
    s = time.perf_counter() - t
    return {"n": n, "dim": dim, "seconds": round(s, 2), "pairs_per_s": round(n * (n + 1) / 2 / s)}


def _nan(x: object) -> float:
    return float("nan") if x is None else float(x)  # type: ignore[arg-type]


def plot(records: list[dict[str, object]], path: Path, title: str, recommended: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [float(r["threshold"]) for r in records]  # type: ignore[arg-type]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(ts, [_nan(r["precision"]) for r in records], "o-", label="precision (pairs)")
    ax1.plot(ts, [_nan(r["recall"]) for r in records], "s-", label="recall (pairs)")
    ax1.plot(ts, [_nan(r["f1"]) for r in records], "^--", label="F1")
    ax1.plot(ts, [_nan(r["group_precision"]) for r in records], ":", label="group precision (one family)")
    ax1.axvline(recommended, color="grey", lw=0.8, ls="--")
    ax1.set_xlabel("threshold (cosine similarity)")
    ax1.set_ylim(0, 1.02)
    ax1.set_title("overall")
    ax1.legend(loc="lower left", fontsize=8)
    for k in KINDS:
        ax2.plot(ts, [_nan(r["per_kind"][k]["recall"]) for r in records], "o-", ms=3, label=k)  # type: ignore[index]
    ax2.axvline(recommended, color="grey", lw=0.8, ls="--")
    ax2.set_xlabel("threshold (cosine similarity)")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("recall by kind of copy")
    ax2.legend(loc="lower left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sheet(pixels: np.ndarray, pairs: list[tuple[int, int, float, str, str]], path: Path, limit: int = 24) -> None:
    """The false pairs side by side, with their similarity and kinds: to judge by eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = pairs[:limit]
    cols = 4
    rows = max(1, -(-len(pairs) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 1.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (a, b, sim, ka, kb) in zip(axes.ravel(), pairs, strict=False):
        ax.imshow(np.concatenate([pixels[a], np.full((32, 2, 3), 255, np.uint8), pixels[b]], axis=1))
        ax.set_title(f"{sim:.3f}  {ka} / {kb}", fontsize=7)
    fig.suptitle("found pairs that were not planted (similarity; kinds of the two images)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="cifar10-offline", help="image source of the originals")
    parser.add_argument("--model", default="default", help="model spec (ascl.models.resolve_model)")
    parser.add_argument("--n", type=int, default=2000, help="originals drawn from --data")
    parser.add_argument("--planted", type=int, default=700, help="originals that get one planted copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=50_000,
                        help="also time the grouping of this many random 128-d unit vectors (0: skip)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for dedup.json/.png")
    args = parser.parse_args(argv)

    from ascl.export.cache import cached_onnx
    from ascl.image_sources import parse_spec
    from ascl.images import decode_image
    from ascl.models import resolve_model
    from ascl.serving.collections.dedup import DEFAULT_THRESHOLD, embed_images, group_near_duplicates

    started, load_before = time.time(), os.getloadavg()
    ref = resolve_model(args.model)
    onnx, _ = cached_onnx(ref)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ascl-dedup-bench-") as tmp:
        folder = Path(tmp)
        truth = plant(args.data, args.n, args.planted, args.seed, folder)
        t = time.perf_counter()
        embedded = embed_images(onnx, folder, progress=False)
        embed_s = time.perf_counter() - t
        names = [str(r["path"]) for r in embedded.records]
        family = np.array([truth[name][0] for name in names])
        kind = [truth[name][1] for name in names]
        pixels = np.stack([decode_image((folder / name).read_bytes(), 32) for name in names])  # [N, 32, 32, 3]
    planted_pairs = {k: sum(1 for kd in kind if kd == k) for k in KINDS}
    records: list[dict[str, object]] = []
    false_by_t: dict[float, list[tuple[int, int, float]]] = {}
    grouping_s = {}
    for threshold in THRESHOLDS:
        t = time.perf_counter()
        groups = group_near_duplicates(embedded.vectors, threshold)
        grouping_s[threshold] = time.perf_counter() - t
        m = pair_metrics([g.members for g in groups], family, kind, planted_pairs)
        false = [(a, b, float(embedded.vectors[a] @ embedded.vectors[b]))
                 for a, b in m.pop("false_pairs")]  # type: ignore[attr-defined]
        false_by_t[threshold] = false
        m.update(threshold=threshold, false_pairs=len(false),
                 false_pairs_similarity_ge_0_98=sum(1 for *_, sim in false if sim >= 0.98),
                 false_pairs_between_originals=sum(1 for a, b, _ in false
                                                   if kind[a] == "original" and kind[b] == "original"))
        records.append(m)
        per = " ".join(f"{k} {_nan(m['per_kind'][k]['recall']):.2f}" for k in KINDS)  # type: ignore[index]
        print(f"T={threshold:.2f}  precision {_nan(m['precision']):.3f}  recall {_nan(m['recall']):.3f}  "
              f"F1 {m['f1']:.3f}  "
              f"groups {m['groups']}  false pairs {m['false_pairs']}  "
              f"recall by kind: {per}", flush=True)
    top = max(float(r["f1"]) for r in records)  # type: ignore[arg-type]
    best = max((r for r in records if float(r["f1"]) >= top - F1_SLACK),  # type: ignore[arg-type]
               key=lambda r: float(r["threshold"]))  # type: ignore[arg-type]
    recommended = float(best["threshold"])  # type: ignore[arg-type]
    originals = sum(1 for k in kind if k == "original")
    scale = scale_timing(args.scale, embedded.vectors.shape[1], DEFAULT_THRESHOLD) if args.scale else None
    shown = sorted(false_by_t[recommended], key=lambda f: -f[2])
    result = {
        "benchmark": "dedup", "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": {"host": platform.node(), "cpu": machine.cpu_name(), "cores": os.cpu_count(),
                    "simd": machine.cpu_simd_flags(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "model": {"spec": args.model, "description": ref.description, "onnx": onnx.name},
        "data": {"source": parse_spec(args.data).source, "originals": originals, "planted_copies": len(names) - originals,
                 "kinds": list(KINDS), "seed": args.seed},
        "embed_s": round(embed_s, 2), "grouping_s": {f"{k:.2f}": round(v, 3) for k, v in grouping_s.items()},
        "recommended_threshold": recommended, "recommendation_rule": f"highest threshold with F1 >= best - {F1_SLACK}",
        "library_default_threshold": DEFAULT_THRESHOLD,
        "false_pairs_at_recommended": [{"kinds": [kind[a], kind[b]], "similarity": round(sim, 4)}
                                       for a, b, sim in shown],
        "thresholds": records, "scale_timing": scale, "wall_s": round(time.time() - started, 1),
    }
    (out / "dedup.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(records, out / "dedup.png",
         f"ascl dedup, {ref.name}: {originals} CIFAR-10 images + {len(names) - originals} planted copies "
         f"(load {load_before[0]:.1f})", float(best["threshold"]))  # type: ignore[arg-type]
    sheet(pixels, [(a, b, sim, kind[a], kind[b]) for a, b, sim in shown], out / "dedup_false_pairs.png")
    print(f"recommended threshold {recommended} (best F1 {top:.3f}): precision {_nan(best['precision']):.3f}, "
          f"recall {_nan(best['recall']):.3f}; {len(shown)} false pairs there (dedup_false_pairs.png); "
          f"wrote {out / 'dedup.json'}, dedup.png and dedup_false_pairs.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
