"""Training throughput: the reference path against the fast path, side by side in one process.

Same model (MoCo-v2 + ASCL, ResNet-18 CIFAR stem at each ``--widths`` base width, split BN,
queue 4096), same batch, same initial weights, each measured after its own warm-up:

- ``reference``: the official recipe: PIL two-view augmentation in DataLoader workers, fp32
  NCHW step (``make_reference_step``), end to end (loading, host-to-device copy, step).
- ``fast``: uint8 images decoded once, the two views made as the training loop's fast path
  makes them (``--views``: OpenCV per image on a CPU, ``CpuTwoViewLoader``; batched tensor ops
  on a GPU, ``GpuTwoViewLoader``), channels_last, fused SGD; on a GPU bf16 and compiled
  networks (``make_fast_step``), end to end.
- ``*_step_only``: the same two steps on one fixed batch already on the device: the ceiling
  each data path could reach. ``fast_share_of_step_only`` says how close the fast path gets.
- on CPU, ``fast_bf16_step_only`` at the narrowest width: the fast step under bf16 autocast,
  and ``bf16_loss_check``: both steps trained side by side from the same weights on the same
  batches, with the largest relative gap of their loss curves (bf16 pays only where it is
  faster *and* keeps the fp32 curve; the training loop's ``amp: auto`` leaves it off on CPU).

Prints pairs/s and the ratios; writes JSON under ``benchmarks/results/``. ``results`` holds the
first width's figures, ``by_width`` every width's.

  python benchmarks/train_throughput.py --batch-size 512                       # GPU
  python benchmarks/train_throughput.py --device cpu                           # CPU: widths 64 and 32
  python benchmarks/train_throughput.py --device cpu --batch-size 8 --steps 2 --warmup 1 \\
      --data synthetic:64 --no-compile --widths 16                             # smoke test
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="pairs per step for both paths (default: 512 on a GPU, 128 on CPU: the CPU recipe's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default: 50 on a GPU, 12 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (worker start-up, cuDNN autotune, torch.compile) "
                        "(default: 10 on a GPU, 3 on CPU)")
    p.add_argument("--widths", default=None,
                   help="comma-separated base widths of the ResNet-18 (default: 64 on a GPU, 64,32 on CPU)")
    p.add_argument("--data", default="cifar10-offline",
                   help="dataset spec (ascl.image_sources: cifar10-offline[:PATH], a folder, digits, ...) or "
                        "synthetic:N for N random uint8 images (default: the offline CIFAR-10 copy)")
    p.add_argument("--image-size", type=int, default=32, help="side of the views and the encoder input (default: 32)")
    p.add_argument("--decode-size", type=int, default=0,
                   help="side the images are decoded and kept at, crops taken from it (default: --image-size)")
    p.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"), help="ResNet stem (default: cifar)")
    p.add_argument("--views", default="auto", choices=("auto", "tensor", "opencv"),
                   help="fast path's views: auto (OpenCV per image on CPU, batched tensor ops on GPU) | tensor | opencv")
    p.add_argument("--workers", type=int, default=min(14, max(1, (os.cpu_count() or 2) - 2)),
                   help="DataLoader workers of the reference path (official recipe: 14) (default: cores - 2, max 14)")
    p.add_argument("--no-compile", action="store_true", help="fast path without torch.compile")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the fast step: default | reduce-overhead | max-autotune-no-cudagraphs")
    p.add_argument("--amp", default="auto", help="fast path autocast: auto (bf16 on CUDA) | bf16 | off")
    p.add_argument("--bn-splits", type=int, default=8, help="split-BN groups (default: 8)")
    p.add_argument("--queue-size", type=int, default=4096, help="MoCo queue length (default: 4096)")
    p.add_argument("--skip-reference", action="store_true", help="measure the fast path only (no ratio)")
    p.add_argument("--no-bf16-check", action="store_true", help="on CPU, skip the bf16 autocast step and loss check")
    p.add_argument("--out", default="", help="JSON path (default: benchmarks/results/train_throughput_<device>.json)")
    return p.parse_args(argv)


def load_images(spec: str, image_size: int) -> Any:
    """uint8 [N, S, S, 3] numpy images: the train split of a dataset, or seeded random ones."""
    import numpy as np

    if spec.startswith("synthetic:"):
        n = int(spec.split(":", 1)[1])
        return np.random.default_rng(0).integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
    from ascl.training.data import load_split

    return load_split(spec, "train", image_size=image_size).images


def build_framework(args: argparse.Namespace, width: int) -> Any:
    """MoCo-v2 + ASCL, ResNet-18 (``--stem``) at base ``width``, the recipe's heads and queue, on the CPU."""
    import torch

    from ascl.training.config import config_from_dict
    from ascl.training.frameworks import build_framework as build

    cfg = config_from_dict({"batch_size": args.batch_size, "data": {"image_size": args.image_size},
                            "model": {"bn_splits": args.bn_splits, "width": width, "stem": args.stem},
                            "moco": {"queue_size": args.queue_size}})
    torch.manual_seed(0)
    return cfg, build(cfg).train()


def fast_loader(args: argparse.Namespace, images: Any, batch: int, mean: Any, std: Any, aug: Any, device: Any,
                seed: int = 0) -> Any:
    """The training loop's fast-path views: OpenCV per image on a CPU, batched tensor ops elsewhere."""
    import torch

    from ascl.training.loop import resolve_views

    if resolve_views(args.views, device) == "opencv":
        from ascl.training.cpu_views import CpuTwoViewLoader

        return CpuTwoViewLoader(images, batch, args.image_size, mean, std, aug, seed=seed)
    from ascl.training.gpu_data import GpuTwoViewLoader

    return GpuTwoViewLoader(torch.from_numpy(images).to(device), batch, args.image_size, mean, std, aug, seed=seed)


def cycle(loader: Any) -> Iterator[tuple[Any, Any]]:
    """Batches across epoch boundaries (each epoch a new order and new augmentations)."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def timed(step: Callable[[Any, Any], Any], batches: Iterable[tuple[Any, Any]], device: Any, warmup: int,
          steps: int) -> dict[str, float]:
    """Run ``warmup`` untimed then ``steps`` timed steps end to end; pairs/s from wall time."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    it = iter(batches)
    t_warm = time.perf_counter()
    loss = None
    for _ in range(warmup):
        x_q, x_k = next(it)
        loss = step(x_q.to(device, non_blocking=True), x_k.to(device, non_blocking=True))
    sync()
    warm_s = time.perf_counter() - t_warm
    batch = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        x_q, x_k = next(it)
        batch = x_q.shape[0]
        loss = step(x_q.to(device, non_blocking=True), x_k.to(device, non_blocking=True))
    sync()
    seconds = time.perf_counter() - t0
    return {"pairs_per_s": round(steps * batch / seconds, 1), "seconds": round(seconds, 3),
            "warmup_seconds": round(warm_s, 2), "last_loss": round(float(loss), 4) if loss is not None else float("nan")}


def bf16_loss_check(args: argparse.Namespace, template: Any, cfg: Any, images: Any, device: Any,
                    steps: int) -> dict[str, Any]:
    """Train an fp32 and a bf16 fast step side by side from the same weights on the same batches."""
    import torch

    from ascl.training.fast import make_fast_optimizer, make_fast_step
    from ascl.training.schedule import base_lr

    curves: dict[str, list[float]] = {}
    for amp in ("off", "bf16"):
        fw = copy.deepcopy(template).to(device)
        opt = make_fast_optimizer(fw.parameters(), base_lr(cfg.optim, cfg.batch_size), cfg.optim.momentum,
                                  cfg.optim.weight_decay)
        step = make_fast_step(fw, opt, amp=amp, compile=False)
        loader = fast_loader(args, images, cfg.batch_size, fw.encoder.mean, fw.encoder.std, cfg.augment, device)
        torch.manual_seed(1)
        curves[amp] = [float(step(x_q, x_k)) for (x_q, x_k), _ in zip(cycle(loader), range(steps), strict=False)]
    gaps = [abs(b - a) / max(abs(a), 1e-9) for a, b in zip(curves["off"], curves["bf16"], strict=True)]
    return {"steps": steps, "fp32_loss": [round(v, 4) for v in curves["off"]],
            "bf16_loss": [round(v, 4) for v in curves["bf16"]], "max_relative_gap": round(max(gaps), 4)}


def measure_width(args: argparse.Namespace, width: int, images: Any, device: Any) -> dict[str, Any]:
    """Every variant at one base width, in this process; returns its results."""

    from ascl.training.fast import make_fast_optimizer, make_fast_step, resolve_amp
    from ascl.training.loaders import ReferenceTwoViewLoader
    from ascl.training.schedule import base_lr, build_optimizer
    from ascl.training.step import make_reference_step

    cfg, template = build_framework(args, width)
    mean, std, aug = template.encoder.mean, template.encoder.std, cfg.augment
    lr = base_lr(cfg.optim, args.batch_size)
    results: dict[str, Any] = {}
    if not args.skip_reference:
        try:  # a reference path that cannot run here (e.g. loader workers without shared memory) is
            # recorded, and the fast path is still measured
            ref = copy.deepcopy(template).to(device)
            ref_step = make_reference_step(ref, build_optimizer(ref, cfg.optim, args.batch_size))
            loader = ReferenceTwoViewLoader(images, args.batch_size, args.image_size, mean, std, aug, seed=0,
                                            num_workers=args.workers, pin_memory=device.type == "cuda")
            results["reference"] = timed(ref_step, cycle(loader), device, args.warmup, args.steps)
            fixed = next(iter(loader))
            fixed = (fixed[0].to(device), fixed[1].to(device))
            results["reference_step_only"] = timed(ref_step, itertools.repeat(fixed), device, args.warmup // 2,
                                                   args.steps)
            del ref, ref_step, loader
        except Exception as exc:
            results["reference_error"] = f"{type(exc).__name__}: {exc}"
            print(f"reference path failed, measuring the fast path alone: {results['reference_error']}", file=sys.stderr)

    fast = copy.deepcopy(template).to(device)
    optimizer = make_fast_optimizer(fast.parameters(), lr, cfg.optim.momentum, cfg.optim.weight_decay)
    amp = "bf16" if resolve_amp(args.amp, device) is not None else "off"
    fast_step = make_fast_step(fast, optimizer, amp=amp, compile=not args.no_compile, compile_mode=args.compile_mode)
    views = fast_loader(args, images, args.batch_size, mean, std, aug, device)
    results["fast"] = timed(fast_step, cycle(views), device, args.warmup, args.steps)
    fixed_fast = next(iter(views))
    results["fast_step_only"] = timed(fast_step, itertools.repeat(fixed_fast), device, args.warmup // 2, args.steps)
    results["fast"]["compiled"] = bool(getattr(fast_step, "compiled", False))
    results["fast_share_of_step_only"] = round(results["fast"]["pairs_per_s"] / results["fast_step_only"]["pairs_per_s"], 3)
    if "reference" in results:
        results["ratio_fast_over_reference"] = round(results["fast"]["pairs_per_s"] / results["reference"]["pairs_per_s"], 2)
    if device.type == "cpu" and args.bf16_check and amp == "off":
        bf16 = copy.deepcopy(template).to(device)
        bf16_step = make_fast_step(bf16, make_fast_optimizer(bf16.parameters(), lr, cfg.optim.momentum,
                                                             cfg.optim.weight_decay), amp="bf16", compile=False)
        results["fast_bf16_step_only"] = timed(bf16_step, itertools.repeat(fixed_fast), device, 1,
                                               max(2, args.steps // 3))
        results["bf16_over_fp32_step"] = round(results["fast_bf16_step_only"]["pairs_per_s"]
                                               / results["fast_step_only"]["pairs_per_s"], 3)
        results["bf16_loss_check"] = bf16_loss_check(args, template, cfg, images, device, max(2, args.steps // 2))
    return results


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """All variants at every width in this process; returns the result record."""
    import torch

    from ascl.training.distributed import resolve_device
    from ascl.training.fast import resolve_amp
    from ascl.training.loop import set_cpu_threads

    device = resolve_device(args.device)
    cpu = device.type == "cpu"
    args.batch_size = args.batch_size or (128 if cpu else 512)
    args.steps = args.steps or (12 if cpu else 50)
    args.warmup = args.warmup if args.warmup is not None else (3 if cpu else 10)
    widths = [int(w) for w in (args.widths or ("64,32" if cpu else "64")).split(",")]
    threads = set_cpu_threads(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # both paths: fixed shapes, fastest conv kernels
    images = load_images(args.data, args.decode_size or args.image_size)
    load_before = os.getloadavg()
    by_width: dict[str, Any] = {}
    for width in widths:
        args.bf16_check = cpu and width == min(widths) and not args.no_bf16_check
        by_width[str(width)] = measure_width(args, width, images, device)
        print(f"width {width}: " + ", ".join(f"{k} {v['pairs_per_s']:.1f}" for k, v in by_width[str(width)].items()
                                             if isinstance(v, dict) and "pairs_per_s" in v), flush=True)
    first = by_width[str(widths[0])]
    amp = "bf16" if resolve_amp(args.amp, device) is not None else "off"
    record: dict[str, Any] = {
        "benchmark": "train_throughput",
        "device": machine.device_name(device), "device_type": device.type, "torch": torch.__version__,
        "cpu": machine.cpu_name(), "cpu_simd": machine.cpu_simd_flags(), "cpu_count": os.cpu_count(),
        "threads": threads, "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "batch_size": args.batch_size, "image_size": args.image_size, "steps": args.steps, "warmup": args.warmup,
        "data": args.data, "images": int(images.shape[0]), "workers": args.workers,
        "compile": not args.no_compile, "compile_mode": args.compile_mode, "amp": amp,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "widths": widths,
        "model": f"MoCo-v2 + ASCL, ResNet-18 {args.stem} stem, split BN x{args.bn_splits}, queue {args.queue_size}",
        "decode_size": args.decode_size or args.image_size, "views": args.views,
        "results": {k: v for k, v in first.items() if isinstance(v, dict) and "pairs_per_s" in v},
        "by_width": by_width,
    }
    if "reference_error" in first:
        record["reference_error"] = first["reference_error"]
    if "ratio_fast_over_reference" in first:
        record["ratio_fast_over_reference"] = first["ratio_fast_over_reference"]
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ascl.atomic import atomic_write_text

    record = measure(args)
    record["command"] = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["train_throughput.py", *argv])
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"train_throughput_{record['device_type']}.json"
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    for width, res in record["by_width"].items():
        for name, r in res.items():
            if isinstance(r, dict) and "pairs_per_s" in r:
                print(f"w{width:<3s} {name:>20s}: {r['pairs_per_s']:10.1f} pairs/s  ({r['seconds']:.2f} s timed, "
                      f"warm-up {r['warmup_seconds']:.1f} s)")
        if "ratio_fast_over_reference" in res:
            print(f"w{width}: fast / reference: {res['ratio_fast_over_reference']:.2f}x, fast / its step-only: "
                  f"{res['fast_share_of_step_only']:.2f} on {record['device']}")
        if "bf16_over_fp32_step" in res:
            print(f"w{width}: bf16 step / fp32 step: {res['bf16_over_fp32_step']:.2f}x, loss curves differ by up to "
                  f"{100 * res['bf16_loss_check']['max_relative_gap']:.1f}%")
    if "ratio_fast_over_reference" in record:
        print(f"fast / reference: {record['ratio_fast_over_reference']:.2f}x on {record['device']}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
