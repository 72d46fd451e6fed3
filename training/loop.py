"""The training loop: batches of (x_q, x_k) into a step function, with schedule, logs and checkpoints.

The loop does not care where batches come from or how a step runs. The fast path (the
default, on CUDA and on CPU) decodes once, keeps the uint8 images on the training device and
makes both views of a batch there in a few batched tensor ops (``gpu_data.GpuTwoViewLoader``),
then runs ``fast.make_fast_step`` (channels_last, fused SGD; bf16 autocast and
``torch.compile`` on CUDA). The reference path (``fast_path: off``) is a DataLoader of PIL
two-view augmentations with an fp32 step. Both are seeded so that ``--resume`` continues exactly.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn

from ascl.encoder import Encoder
from ascl.image_sources import DecodedImages
from ascl.training import distributed as D
from ascl.training.checkpoint import restore, save_checkpoint, training_state
from ascl.training.config import ConfigError, TrainConfig, config_to_dict
from ascl.training.data import load_split
from ascl.training.frameworks import build_encoder, build_framework
from ascl.training.knn import embed_images, knn_accuracy
from ascl.training.loaders import ReferenceTwoViewLoader
from ascl.training.metrics import MetricsWriter, plot_curves
from ascl.training.schedule import base_lr, build_optimizer, build_scheduler
from ascl.training.step import Step, make_reference_step


@dataclass
class TrainResult:
    """What a run ended with."""

    run_dir: Path
    checkpoint: Path | None
    step: int
    epoch: int
    interrupted: bool
    loss: float | None = None
    knn_top1: float | None = None


class StopSignal:
    """SIGINT/SIGTERM set a flag so the loop saves a checkpoint before exiting; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignal:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers, the run just cannot be interrupted cleanly
            self._old.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def channel_stats(images: np.ndarray, limit: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N, S, S, 3] scaled to [0, 1] (first ``limit`` images)."""
    x = images[:limit].reshape(-1, 3).astype(np.float64) / 255.0
    std = np.maximum(x.std(0), 1e-3)
    return tuple(round(float(v), 4) for v in x.mean(0)), tuple(round(float(v), 4) for v in std)


FAST_DEVICES = ("cuda", "cpu")


def fast_path_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """``auto`` and ``on``: the fast path on CUDA and CPU; ``off``: the reference path."""
    if cfg.fast_path == "on" and device.type not in FAST_DEVICES:
        raise ConfigError(f"fast_path=on runs on {' or '.join(FAST_DEVICES)}, not {device.type}; use fast_path=off")
    return cfg.fast_path != "off" and device.type in FAST_DEVICES


def resolve_compile(switch: str, device: torch.device) -> bool:
    """``auto`` -> compile on CUDA only: on a 2-core CPU, Inductor took 3 minutes to compile
    the networks and gave no faster step (convolutions are oneDNN calls either way)."""
    return switch == "on" or (switch == "auto" and device.type == "cuda")


def set_cpu_threads(device: torch.device, local_world_size: int = 1) -> int:
    """Intra-op threads for a CPU run: the cores this process may use, shared by local ranks.

    ``OMP_NUM_THREADS``, when set, is the user's choice and is kept. Returns the thread count
    (unchanged on CUDA, where the CPU only feeds the GPU).
    """
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


@dataclass
class Run:
    """Everything one training run holds, and where it is."""

    cfg: TrainConfig
    info: D.DistInfo
    run_dir: Path
    encoder: Encoder
    framework: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    step_fn: Step
    metrics: MetricsWriter | None
    epoch: int = 0
    batch: int = 0
    step: int = 0
    last_loss: float | None = None
    knn_top1: float | None = None
    train_seconds: float = 0.0  # training wall time of every sitting so far (kNN excluded)
    knn_sets: tuple[DecodedImages, DecodedImages] | None = field(default=None, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)


def resolve_views(views: str, device: torch.device) -> str:
    """``auto`` -> ``opencv`` on a CPU (one image at a time in SIMD code: at 128 px the batched tensor
    ops cost as much as the step there), ``tensor`` on a GPU (batched ops on the device)."""
    if views == "auto":
        return "opencv" if device.type == "cpu" else "tensor"
    if views == "opencv" and device.type != "cpu":
        raise ConfigError(f"views=opencv makes its views on the CPU; on {device.type} use views: tensor")
    return views


def make_loader(cfg: TrainConfig, images: np.ndarray, encoder: Encoder, info: D.DistInfo, fast: bool) -> Any:
    """The per-rank iterable of (x_q, x_k) batches: the fast path's views when ``fast`` (OpenCV per
    image on a CPU, batched tensor ops on a GPU), else PIL workers."""
    per_rank = cfg.batch_size // info.world_size
    if fast and resolve_views(cfg.views, info.device) == "opencv":
        from ascl.training.cpu_views import CpuTwoViewLoader

        return CpuTwoViewLoader(images, per_rank, cfg.data.image_size, encoder.mean, encoder.std, cfg.augment,
                                seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    if fast:
        from ascl.training.gpu_data import GpuTwoViewLoader

        on_device = torch.from_numpy(np.ascontiguousarray(images)).to(info.device)  # each rank takes its share
        return GpuTwoViewLoader(on_device, per_rank, cfg.data.image_size, encoder.mean, encoder.std, cfg.augment,
                                seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                                channels_last=cfg.channels_last, drop_last=True)
    return ReferenceTwoViewLoader(images, per_rank, cfg.data.image_size, encoder.mean, encoder.std, cfg.augment,
                                  seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                                  num_workers=min(cfg.data.num_workers, os.cpu_count() or 1),
                                  pin_memory=info.device.type == "cuda")


def make_step(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, fast: bool,
              device: torch.device) -> Step:
    if fast:
        from ascl.training.fast import make_fast_step

        return make_fast_step(model, optimizer, amp=cfg.amp,
                              compile=resolve_compile(cfg.compile, device), channels_last=cfg.channels_last)
    return make_reference_step(model, optimizer)


def _fast_available(cfg: TrainConfig, device: torch.device) -> bool:
    fast = fast_path_enabled(cfg, device)
    if fast and cfg.fast_path == "auto":
        try:
            import ascl.training.fast  # noqa: F401
            import ascl.training.gpu_data  # noqa: F401
        except ImportError as exc:
            warnings.warn(f"fast path unavailable ({exc}); using the reference data path", stacklevel=2)
            return False
    return fast


def build_run(cfg: TrainConfig, run_dir: Path, resume: Path | None = None, ckpt: dict[str, Any] | None = None) -> Run:
    """Data, model, optimiser, schedule, loader and step for ``cfg``; restored from ``ckpt`` if given."""
    info = D.init_from_env(cfg.device)
    set_cpu_threads(info.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the {info.world_size} processes")
    if (cfg.batch_size // info.world_size) % cfg.model.bn_splits:
        raise ConfigError(f"per-process batch {cfg.batch_size // info.world_size} must be a multiple of "
                          f"model.bn_splits={cfg.model.bn_splits}")
    torch.manual_seed(cfg.seed)
    train_set = load_split(cfg.data.spec, "train", image_size=cfg.data.decode_size or cfg.data.image_size,
                           val_fraction=cfg.data.val_fraction, subset=cfg.data.subset)
    mean, std = (tuple(ckpt["encoder_config"]["mean"]), tuple(ckpt["encoder_config"]["std"])) if ckpt else channel_stats(train_set.images)
    encoder = build_encoder(cfg, mean, std)
    framework = build_framework(cfg, encoder).to(info.device).train()
    fast = _fast_available(cfg, info.device)
    if fast and cfg.channels_last:  # before DDP wraps it, so DDP sees the final parameter layout
        framework.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model: nn.Module = framework
    if info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            framework, device_ids=[info.device.index] if info.device.type == "cuda" else None, forward_sync_buffers=False
        )
    loader = make_loader(cfg, train_set.images, encoder, info, fast)
    if len(loader) == 0:
        raise ConfigError(f"{cfg.data.spec}: {len(train_set)} training images make no full batch of "
                          f"{cfg.batch_size // info.world_size} per process; lower batch_size")
    if fast:  # the same SGD, fused into a few kernels (and safe with channels_last momentum buffers)
        from ascl.training.fast import make_fast_optimizer

        optimizer: torch.optim.Optimizer = make_fast_optimizer(
            framework.parameters(), base_lr(cfg.optim, cfg.batch_size), cfg.optim.momentum, cfg.optim.weight_decay
        )
    else:
        optimizer = build_optimizer(framework, cfg.optim, cfg.batch_size)
    scheduler = build_scheduler(optimizer, cfg.epochs * len(loader), int(round(cfg.optim.warmup_epochs * len(loader))))
    position = (0, 0, 0)
    if ckpt is not None and resume is not None:  # before the step is made: it may re-layout optimiser state
        position = restore(ckpt, resume, framework, optimizer, scheduler, encoder)
    run = Run(cfg, info, run_dir, encoder, framework, optimizer, scheduler, loader,
              make_step(cfg, model, optimizer, fast, info.device), None, *position)
    if ckpt is not None and resume is not None:
        run.train_seconds = float(ckpt.get("train_seconds", 0.0))
    if run.batch >= run.steps_per_epoch:
        run.epoch, run.batch = run.epoch + 1, 0
    if info.is_main:
        run.metrics = MetricsWriter(run_dir, resume_step=run.step if ckpt is not None else None)
    return run


def knn_monitor(run: Run) -> float:
    """kNN top-1 on the val split against train-split features (no augmentation)."""
    cfg = run.cfg
    if run.knn_sets is None:
        size, fraction = cfg.data.image_size, cfg.data.val_fraction
        run.knn_sets = (
            load_split(cfg.data.spec, "train", image_size=size, val_fraction=fraction,
                       subset=cfg.eval.knn_train_subset or cfg.data.subset),
            load_split(cfg.data.spec, "val", image_size=size, val_fraction=fraction, subset=cfg.eval.knn_val_subset),
        )
    bank_set, val_set = run.knn_sets
    dev = run.info.device
    bank = embed_images(run.encoder, torch.from_numpy(bank_set.images), cfg.eval.batch_size, dev)
    queries = embed_images(run.encoder, torch.from_numpy(val_set.images), cfg.eval.batch_size, dev)
    return knn_accuracy(bank, torch.from_numpy(bank_set.labels), queries, torch.from_numpy(val_set.labels),
                        cfg.eval.knn_k, cfg.eval.knn_t)


def save(run: Run, epoch_file: bool) -> Path:
    """Checkpoint on rank 0: ``checkpoints/last.pt`` (+ ``epoch_XXXX.pt`` at epoch ends)."""
    folder = run.run_dir / "checkpoints"
    last = folder / "last.pt"
    if run.info.is_main:
        state = training_state(run.framework, run.optimizer, run.scheduler, config=config_to_dict(run.cfg),
                               encoder=run.encoder, epoch=run.epoch, batch=run.batch, step=run.step,
                               train_seconds=run.train_seconds)
        if epoch_file:
            save_checkpoint(folder / f"epoch_{run.epoch:04d}.pt", state, copies=(last,))
        else:
            save_checkpoint(last, state)
        if run.metrics is not None:
            plot_curves(run.metrics.csv_path, run.run_dir / "curves.png")
    D.barrier()
    return last


def _batches(run: Run) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """This epoch's batches from the current position (resume mid-epoch skips what was done)."""
    loader = run.loader
    try:
        loader.set_epoch(run.epoch, run.batch)
        return loader  # type: ignore[no-any-return]
    except TypeError:  # a loader without start_batch: skip by iterating
        loader.set_epoch(run.epoch)
        return itertools.islice(loader, run.batch, None)


def _log(run: Run, running: torch.Tensor, count: int, elapsed: float, lr: float, bar: Any, total_s: float) -> None:
    """Sync the running loss to the host (only here), write metrics, refresh the bar."""
    loss = float(D.all_reduce_mean(running / count).item())
    pairs = count * run.cfg.batch_size / max(elapsed, 1e-9)
    run.last_loss = loss
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", pairs_s=f"{pairs:.0f}")
    if run.metrics is not None:
        run.metrics.log(run.step, run.epoch + run.batch / run.steps_per_epoch, loss=loss, lr=lr, pairs_per_s=pairs,
                        elapsed_s=total_s)


def _should_stop(run: Run, stop: StopSignal, at_log: bool) -> bool:
    if run.cfg.max_steps and run.step >= run.cfg.max_steps:
        return True
    if not D.is_distributed():
        return stop.requested
    if not at_log:
        return False
    flag = torch.tensor([float(stop.requested)], device=run.info.device)
    return bool(D.all_reduce_mean(flag).item() > 0)


def train_epoch(run: Run, stop: StopSignal, progress: bool) -> bool:
    """One epoch (or its remainder); True when the run must stop early (signal or max_steps)."""
    from tqdm import tqdm

    dev, cfg = run.info.device, run.cfg
    bar = tqdm(total=run.steps_per_epoch, initial=run.batch, desc=f"epoch {run.epoch + 1}/{cfg.epochs}",
               disable=not (progress and run.info.is_main), dynamic_ncols=True, unit="step")
    running, count, t0 = torch.zeros((), device=dev), 0, time.perf_counter()
    started = t0
    try:
        for x_q, x_k in _batches(run):
            lr = run.optimizer.param_groups[0]["lr"]
            loss = run.step_fn(x_q.to(dev, non_blocking=True), x_k.to(dev, non_blocking=True))
            run.scheduler.step()
            running += loss
            count, run.batch, run.step = count + 1, run.batch + 1, run.step + 1
            bar.update(1)
            at_log = run.step % cfg.log_every == 0 or run.batch == run.steps_per_epoch or run.step == 1
            stopping = _should_stop(run, stop, at_log)
            if at_log or stopping:
                now = time.perf_counter()
                _log(run, running, count, now - t0, lr, bar, run.train_seconds + now - started)
                running, count, t0 = torch.zeros((), device=dev), 0, time.perf_counter()
            if stopping:
                return True
    finally:
        bar.close()
        run.train_seconds += time.perf_counter() - started
    return False


def write_run_info(run_dir: Path, device: torch.device, seconds: float, *, world_size: int = 1) -> None:
    """Record hardware and training wall time in ``run.json`` (read by ``ascl push`` for the card).

    A resumed run adds its time to what the file already holds.
    """
    import json

    from ascl.atomic import atomic_write_text
    from ascl.machine import cpu_simd_flags, device_name

    path = run_dir / "run.json"
    previous = 0.0
    if path.is_file():
        try:
            previous = float(json.loads(path.read_text(encoding="utf-8")).get("wall_time_s", 0.0))
        except (ValueError, AttributeError):
            previous = 0.0
    name = device_name(device)
    if device.type == "cpu" and (simd := cpu_simd_flags()):
        name = f"{name}, {'/'.join(simd).upper()}"
    info = {"hardware": f"{world_size} x {name}" if world_size > 1 else name,
            "wall_time_s": round(previous + seconds, 1), "torch": torch.__version__}
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")


def train(cfg: TrainConfig, run_dir: Path, *, resume: Path | None = None, ckpt: dict[str, Any] | None = None,
          progress: bool = True) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (continuing from checkpoint ``ckpt`` read from ``resume``)."""
    run = build_run(cfg, run_dir, resume, ckpt)
    interrupted, last = False, None
    started = time.perf_counter()
    try:
        with StopSignal() as stop:
            while run.epoch < cfg.epochs:
                stopped = train_epoch(run, stop, progress)
                if stopped:
                    interrupted = stop.requested
                    last = save(run, epoch_file=False)
                    break
                run.epoch, run.batch = run.epoch + 1, 0
                if cfg.eval.knn_every and (run.epoch % cfg.eval.knn_every == 0 or run.epoch == cfg.epochs):
                    run.knn_top1 = knn_monitor(run)
                    if run.metrics is not None:
                        run.metrics.log(run.step, float(run.epoch), knn_top1=run.knn_top1, elapsed_s=run.train_seconds)
                    if progress and run.info.is_main:
                        print(f"epoch {run.epoch}: kNN top-1 (val) {100 * run.knn_top1:.2f}%", flush=True)
                if run.epoch % cfg.checkpoint_every == 0 or run.epoch == cfg.epochs:
                    last = save(run, epoch_file=True)
            if last is None:
                last = save(run, epoch_file=False)
    finally:
        if run.metrics is not None:
            run.metrics.close()
        if run.info.is_main:
            write_run_info(run_dir, run.info.device, time.perf_counter() - started, world_size=D.world_size())
    return TrainResult(run_dir, last, run.step, run.epoch, interrupted, run.last_loss, run.knn_top1)
