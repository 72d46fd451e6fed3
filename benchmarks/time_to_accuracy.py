"""Time to accuracy: train ASCL (MoCo-v2 + ASCL loss) with the training library and record
training wall time and kNN top-1 on the held-out validation split per monitored epoch.

The run goes through ``ascl.training.loop`` exactly as ``ascl train`` does (fast path on a
GPU: uint8 data on the device, GPU augmentation, compiled bf16 step); only the epoch loop is
driven here so that training time (synchronised at every epoch end) is kept apart from kNN
evaluation time. Writes JSON and a PNG of the curve under ``--out-dir`` and saves the final
encoder as a hub folder (config.json + safetensors shards) under ``--encoder-out``.

  python benchmarks/time_to_accuracy.py --epochs 200 --batch-size 512          # GPU
  python benchmarks/time_to_accuracy.py --epochs 1 --subset 200 --device cpu   # smoke test
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

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="cifar10-offline",
                   help="dataset spec (ascl.image_sources): cifar10-offline[:PATH/train.tar.gz], a folder, digits")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (the cosine schedule spans them)")
    p.add_argument("--batch-size", type=int, default=512, help="pairs per step; lr scales linearly with it")
    p.add_argument("--lr-per-256", type=float, default=0.06, help="base lr per 256 pairs (lr = this x batch / 256)")
    p.add_argument("--warmup-epochs", type=float, default=5.0, help="linear lr warm-up before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--t1", type=float, default=0.1, help="ASCL query temperature")
    p.add_argument("--t2", type=float, default=0.05, help="ASCL key-to-queue temperature")
    p.add_argument("--queue-size", type=int, default=4096, help="MoCo queue length K")
    p.add_argument("--momentum", type=float, default=0.99, help="momentum encoder EMA")
    p.add_argument("--bn-splits", type=int, default=8, help="split-BN groups (shuffle-BN on one GPU)")
    p.add_argument("--image-size", type=int, default=32, help="training and evaluation image side")
    p.add_argument("--subset", type=int, default=0, help="train on this many images only (0 = all); for smoke tests")
    p.add_argument("--knn-every", type=int, default=20, help="kNN monitor every N epochs (and at the end)")
    p.add_argument("--knn-val-subset", type=int, default=0, help="val images for the kNN monitor (0 = all 5,000)")
    p.add_argument("--linear-probe-epochs", type=int, default=0,
                   help="after training, a linear probe on frozen features for this many epochs (0 = skip)")
    p.add_argument("--linear-probe-batch", type=int, default=256, help="linear-probe batch size (Adam, lr 1e-3)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the reference path (CPU runs)")
    p.add_argument("--no-compile", action="store_true", help="run the fast step eagerly (no torch.compile)")
    p.add_argument("--fast-path", default="auto", choices=("auto", "on", "off"),
                   help="GPU data path + fast step: auto = on with CUDA; off = the reference path")
    p.add_argument("--seed", type=int, default=0, help="run seed")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where JSON and PNG go")
    p.add_argument("--tag", default="", help="file name tag (default: the device kind)")
    p.add_argument("--encoder-out", default="", help="save the final encoder as a hub folder here ('' = skip)")
    p.add_argument("--max-shard-size", default="15MB", help="safetensors shard limit for --encoder-out")
    p.add_argument("--run-dir", default="", help="run folder for metrics (default: a temporary folder)")
    p.add_argument("--stop-at", type=float, default=0.0,
                   help="wall-clock deadline (Unix time) for training: no epoch starts that would end after it, "
                        "so a time-boxed run still evaluates and saves (0 = none; the schedule is not shortened)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Any:
    """The paper's recipe with this run's batch size, lr scaling and schedule."""
    from ascl.training.config import config_from_dict
    from ascl.training.knn import KNN_K, KNN_T

    return config_from_dict({
        "name": "time_to_accuracy", "seed": args.seed, "device": args.device, "framework": "moco",
        "epochs": args.epochs, "batch_size": args.batch_size, "log_every": 50, "checkpoint_every": args.epochs,
        "compile": not args.no_compile, "fast_path": args.fast_path,
        "data": {"spec": args.data, "image_size": args.image_size, "val_fraction": 0.1, "subset": args.subset,
                 "num_workers": args.workers},
        "model": {"arch": "resnet18", "stem": "cifar", "bn_splits": args.bn_splits},
        "moco": {"queue_size": args.queue_size, "momentum": args.momentum},
        "loss": {"mode": "ascl", "t1": args.t1, "t2": args.t2, "n_neighbors": 1},
        "optim": {"lr_per_256": args.lr_per_256, "momentum": 0.9, "weight_decay": args.weight_decay,
                  "warmup_epochs": args.warmup_epochs},
        "eval": {"knn_every": args.knn_every, "knn_k": KNN_K, "knn_t": KNN_T, "knn_val_subset": args.knn_val_subset},
    }).validate()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def next_epoch_fits(stop_at: float, now: float, epoch_seconds: list[float]) -> bool:
    """Whether one more epoch (as long as the slowest of the last three) ends before ``stop_at``."""
    if stop_at <= 0 or not epoch_seconds:
        return True
    return now + max(epoch_seconds[-3:]) <= stop_at


def train_and_monitor(cfg: Any, run_dir: Path, stop_at: float = 0.0
                      ) -> tuple[Any, list[dict[str, float]], dict[str, Any]]:
    """Train epoch by epoch; returns (run, curve rows, facts). Training time excludes kNN time.

    With ``stop_at`` (Unix time) it stops at the last epoch that fits, then still takes the kNN
    point of that epoch: a device run with a hard time limit keeps its results and weights.
    """
    from ascl.training.loop import StopSignal, build_run, knn_monitor, train_epoch

    t_setup = time.perf_counter()
    run = build_run(cfg, run_dir)
    setup_s = time.perf_counter() - t_setup
    curve: list[dict[str, float]] = []
    train_s, knn_s = 0.0, 0.0
    epoch_seconds: list[float] = []
    stopped_at_deadline = False
    with StopSignal() as stop:
        while run.epoch < cfg.epochs:
            _sync(run.info.device)
            t0 = time.perf_counter()
            stopped = train_epoch(run, stop, progress=False)
            _sync(run.info.device)
            epoch_seconds.append(round(time.perf_counter() - t0, 3))
            train_s += epoch_seconds[-1]
            if stopped:
                break
            run.epoch, run.batch = run.epoch + 1, 0
            stopped_at_deadline = run.epoch < cfg.epochs and not next_epoch_fits(stop_at, time.time(), epoch_seconds)
            last = run.epoch == cfg.epochs or stopped_at_deadline
            if run.epoch % cfg.eval.knn_every == 0 or last or run.epoch == 1:
                t1 = time.perf_counter()
                top1 = knn_monitor(run)
                knn_s += time.perf_counter() - t1
                row = {"epoch": run.epoch, "train_seconds": round(train_s, 2), "knn_top1": round(100 * top1, 2),
                       "loss": run.last_loss if run.last_loss is not None else float("nan")}
                curve.append(row)
                print(f"epoch {run.epoch:4d}  train {train_s:8.1f} s  kNN top-1 {100 * top1:6.2f}%  "
                      f"loss {row['loss']:.4f}", flush=True)
            if stopped_at_deadline:
                print(f"deadline: stopping after epoch {run.epoch} of {cfg.epochs}", flush=True)
                break
    facts = {"setup_seconds": round(setup_s, 2), "train_seconds": round(train_s, 2), "knn_seconds": round(knn_s, 2),
             "steps": run.step, "steps_per_epoch": run.steps_per_epoch, "loader": type(run.loader).__name__,
             "epochs_done": run.epoch, "stopped_at_deadline": stopped_at_deadline,
             "epoch_seconds": epoch_seconds}  # the first one includes torch.compile
    if run.metrics is not None:
        run.metrics.close()
    return run, curve, facts


def linear_probe(run: Any, epochs: int, batch_size: int = 256) -> float:
    """Linear-probe top-1 (%) on the val split, frozen features of the final encoder."""
    import torch

    from ascl.training.data import load_split
    from ascl.training.knn import embed_images
    from ascl.training.linear_probe import train_linear_probe

    cfg, dev = run.cfg, run.info.device
    feats = []
    for split in ("train", "val"):
        data = load_split(cfg.data.spec, split, image_size=cfg.data.image_size, val_fraction=cfg.data.val_fraction,
                          subset=cfg.data.subset if split == "train" else 0)
        x = embed_images(run.encoder, torch.from_numpy(data.images), 1024, dev, normalize=False)
        feats += [x, torch.from_numpy(data.labels).to(dev)]
    return round(100 * train_linear_probe(*feats, epochs=epochs, batch_size=batch_size)["val_top1"], 2)


def plot_curve(curve: list[dict[str, float]], title: str, path: Path) -> None:
    """kNN top-1 against training wall time (bottom axis) with epochs annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ascl.training.metrics import save_png

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    minutes = [r["train_seconds"] / 60 for r in curve]
    ax.plot(minutes, [r["knn_top1"] for r in curve], marker="o")
    for r, m in zip(curve, minutes, strict=True):
        ax.annotate(f"{int(r['epoch'])}", (m, r["knn_top1"]), textcoords="offset points", xytext=(0, 5),
                    fontsize=7, ha="center")
    ax.set_xlabel("training wall time (min)")
    ax.set_ylabel("kNN top-1 on val split (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from ascl.atomic import atomic_write_text

    cfg = build_config(args)
    with tempfile.TemporaryDirectory(prefix="ascl-tta-") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp)
        run, curve, facts = train_and_monitor(cfg, run_dir, args.stop_at)
    dev = run.info.device
    result: dict[str, Any] = {
        "benchmark": "time_to_accuracy",
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["time_to_accuracy.py", *argv]),
        "device": machine.device_name(dev), "device_type": dev.type, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "recipe": {"framework": "moco", "loss": "ascl", "t1": cfg.loss.t1, "t2": cfg.loss.t2, "queue_size": cfg.moco.queue_size,
                   "momentum": cfg.moco.momentum, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                   "lr": cfg.optim.lr_per_256 * cfg.batch_size / 256, "lr_per_256": cfg.optim.lr_per_256,
                   "lr_scaling": "linear (lr_per_256 x batch / 256)", "warmup_epochs": cfg.optim.warmup_epochs,
                   "schedule": "per-step linear warm-up then cosine to 0", "weight_decay": cfg.optim.weight_decay,
                   "sgd_momentum": cfg.optim.momentum, "bn_splits": cfg.model.bn_splits, "arch": "resnet18 (cifar stem)",
                   "compile": cfg.compile, "data": cfg.data.spec, "subset": cfg.data.subset,
                   "val_split": "last 10% of every class of the training split (500 per class on CIFAR-10)"},
        **facts,
        "curve": curve,
        "final_knn_top1": curve[-1]["knn_top1"] if curve else None,
        "pairs_per_s": round(facts["steps"] * cfg.batch_size / max(facts["train_seconds"], 1e-9), 1),
    }
    later = facts["epoch_seconds"][1:]
    if later:  # without the first epoch (torch.compile, cuDNN autotune)
        result["pairs_per_s_after_epoch_1"] = round(len(later) * facts["steps_per_epoch"] * cfg.batch_size / sum(later), 1)
    if args.linear_probe_epochs > 0:
        t0 = time.perf_counter()
        result["linear_probe_top1"] = linear_probe(run, args.linear_probe_epochs, args.linear_probe_batch)
        result["linear_probe_epochs"] = args.linear_probe_epochs
        result["linear_probe_batch"] = args.linear_probe_batch
        result["linear_probe_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"linear probe top-1 {result['linear_probe_top1']:.2f}%", flush=True)
    out_dir = Path(args.out_dir)
    tag = args.tag or dev.type
    png = out_dir / f"time_to_accuracy_{tag}.png"
    if curve:
        plot_curve(curve, f"ASCL ResNet-18, {cfg.epochs} epochs, batch {cfg.batch_size}, {result['device']}", png)
        result["png"] = png.name
    if args.encoder_out:
        from ascl.weights import save_weights

        encoder = run.encoder.cpu().eval()
        folder = Path(args.encoder_out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "config.json", json.dumps(encoder.config(), indent=2) + "\n")
        result["encoder_files"] = [p.name for p in save_weights(encoder, folder, max_shard_size=args.max_shard_size)]
    atomic_write_text(out_dir / f"time_to_accuracy_{tag}.json", json.dumps(result, indent=2) + "\n")
    print(f"train {facts['train_seconds']:.1f} s for {run.epoch} of {cfg.epochs} epochs ({result['pairs_per_s']:.0f} pairs/s); "
          f"final kNN top-1 {result['final_knn_top1']}%  -> {out_dir / f'time_to_accuracy_{tag}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
