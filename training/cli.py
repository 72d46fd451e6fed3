"""``ascl train`` and ``ascl eval {knn,linear}``: thin argparse over the training library.

Only argparse at import time; torch is imported inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ascl.errors import InputError, user_errors
from ascl.image_sources import describe_specs

DEFAULT_CONFIG = "cifar10_resnet18"
FLAG_KEYS = {
    "data": "data.spec", "epochs": "epochs", "batch_size": "batch_size", "max_steps": "max_steps", "out": "out",
    "framework": "framework", "mode": "loss.mode", "device": "device", "seed": "seed",
}


class FMT(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for options whose default comes from the config (None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


# Builtin errors of torch, PIL and the file system that mean bad input here; ConfigError,
# DataError, CheckpointError and ImageError are AsclErrors and reach the root CLI as they are.
USER_ERRORS = (FileNotFoundError, RuntimeError, ValueError)


def add_train(sub: Any) -> None:
    from ascl.training.config import LOSS_MODES  # no torch: the config module is plain dataclasses

    p = sub.add_parser(
        "train", formatter_class=FMT, help="train an encoder with ASCL (MoCo-v2 or BYOL)",
        description="Self-supervised training with ASCL. Writes RUN/config.yaml, RUN/checkpoints/last.pt, "
        "RUN/metrics.csv, RUN/curves.png and RUN/tensorboard/. Multi-GPU: torchrun --nproc-per-node N -m ascl train ...",
    )
    p.add_argument("--config", default=None,
                   help=f"YAML file or shipped config name (cifar10_resnet18 = the paper's 200-epoch recipe, "
                        f"digits_tiny = seconds on CPU); default {DEFAULT_CONFIG}, or the checkpoint's config with --resume")
    p.add_argument("--data", help=f"dataset: {describe_specs()} (default: from the config)")
    p.add_argument("--epochs", type=int, help="epochs; the cosine schedule spans all of them (default: from the config)")
    p.add_argument("--batch-size", type=int, help="global batch size; lr scales as optim.lr_per_256 x batch/256 (default: config)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (a smoke run; the schedule still spans "
                                                 "--epochs), 0 = no limit (default: config)")
    p.add_argument("--out", help="run folder (default: runs/<config name>; must not hold a run unless --resume)")
    p.add_argument("--framework", choices=["moco", "byol"], help="moco (queue, the paper's default) or byol (default: config)")
    p.add_argument("--mode", choices=LOSS_MODES,
                   help="loss: ascl (soft, adaptive), ahcl, hard, none = plain MoCo/BYOL (default: config)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto = cuda when available (default: config)")
    p.add_argument("--seed", type=int, help="random seed (default: config)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_OR_CKPT",
                   help="continue a run exactly (model, momentum encoder, queue, optimiser, schedule, RNG, position); "
                        "without a value: the --out folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted, value as YAML, e.g. --set loss.t2=0.1 --set eval.knn_every=0")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (metrics still go to the run folder)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ascl.atomic import atomic_write_text
    from ascl.checkpoints import run_folder_of
    from ascl.training import distributed as D
    from ascl.training.checkpoint import find_checkpoint, load_checkpoint
    from ascl.training.config import ConfigError, dump_config, load_config
    from ascl.training.loop import train

    try:
        with user_errors(*USER_ERRORS):
            overrides = [f"{key}={getattr(args, flag)}" for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None]
            overrides += list(args.set)
            ckpt, resume = None, None
            if args.resume is not None:
                resume = find_checkpoint(args.resume or args.out or "")
                ckpt = load_checkpoint(resume)
            config = args.config if (args.config or ckpt) else DEFAULT_CONFIG
            base = {**ckpt["config"], "out": ""} if ckpt else None  # a resumed run stays where its checkpoint is
            cfg = load_config(config, overrides, base=base)
            run_dir = Path(cfg.out) if cfg.out else ((run_folder_of(resume) or resume.parent) if resume else Path("runs") / cfg.name)
            cfg.out = str(run_dir)
            if args.print_config:
                print(dump_config(cfg), end="")
                return 0
            if resume is None and (run_dir / "checkpoints").exists():
                raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pick --out NEW")
            if D.rank() == 0:
                atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
            result = train(cfg, run_dir, resume=resume, ckpt=ckpt, progress=not args.no_progress)
            is_main = D.rank() == 0
    finally:
        D.cleanup()
    if not is_main:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted at step {result.step}; saved {result.checkpoint}. Continue: ascl train --resume {run_dir}",
              file=sys.stderr)
        return 130
    print(f"done: step {result.step}, epoch {result.epoch}, loss {result.loss}; checkpoint {result.checkpoint}\n"
          f"evaluate: ascl eval knn {run_dir}   |   ascl eval linear {run_dir}")
    return 0


def _add_eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a training checkpoint (.pt) or run folder; with ascl.hub also a hub folder, "
                                 "a shipped model name or a hub repo id")
    p.add_argument("--data", help="dataset spec (see 'ascl train --help'); default: the one the checkpoint trained on")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out share of each class when the dataset has no test split (must match training)")
    p.add_argument("--train-subset", type=int, default=0, help="use only N train images as bank/probe set (0 = all); "
                                                               "5000 gives a quick estimate on CPU")
    p.add_argument("--val-subset", type=int, default=0, help="use only N val images (0 = all)")
    p.add_argument("--batch-size", type=int, default=512, help="embedding batch size; lower it if memory runs out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda when available")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")


def add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", formatter_class=FMT, help="evaluate an encoder: kNN or linear probe",
                       description="Evaluate a trained encoder on the val split of a dataset.")
    ev = p.add_subparsers(dest="eval_command", metavar="<kind>")
    ev.required = True
    knn = ev.add_parser("knn", formatter_class=FMT, help="weighted kNN top-1 (k=200, t=0.1)",
                        description="kNN top-1: val embeddings vote among their k nearest train embeddings.")
    _add_eval_common(knn)
    # None: the protocol's ascl.training.knn.KNN_K / KNN_T (not imported here: it loads torch)
    knn.add_argument("--k", type=int, default=None,
                     help="neighbours that vote (default: the protocol's KNN_K, k=200, the standard for CIFAR)")
    knn.add_argument("--t", type=float, default=None,
                     help="vote temperature: weights exp(similarity / t) (default: the protocol's KNN_T, t=0.1)")
    knn.set_defaults(func=cmd_eval)
    lin = ev.add_parser("linear", formatter_class=FMT, help="linear probe top-1 on frozen features",
                        description="Linear probe: a linear classifier on frozen, pre-extracted pooled features.")
    _add_eval_common(lin)
    lin.add_argument("--epochs", type=int, default=100, help="probe epochs over the features (cheap: features are cached)")
    lin.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the probe (cosine decay)")
    lin.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ascl.atomic import atomic_write_text
    from ascl.training.evaluate import EvalData, default_data, evaluate_knn, evaluate_linear, load_model

    with user_errors(*USER_ERRORS):
        spec = args.data or default_data(args.model)
        if spec is None:
            raise InputError(f"{args.model}: no training config to take the dataset from; pass --data")
        encoder = load_model(args.model)
        data = EvalData(spec, args.val_fraction, args.train_subset, args.val_subset, args.batch_size, args.device)
        if args.eval_command == "knn":
            protocol = {name: value for name, value in (("k", args.k), ("t", args.t)) if value is not None}
            result = evaluate_knn(encoder, data, **protocol)  # KNN_K / KNN_T unless given
        else:
            result = evaluate_linear(encoder, data, epochs=args.epochs, lr=args.lr)
    result["model"] = str(args.model)
    print(f"{result['metric']}: {100 * result['value']:.2f}% on {result['val_images']} val images of {spec} "
          f"({result['train_images']} train images)")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def register(sub: Any) -> None:
    """Add ``train`` and ``eval`` to the ``ascl`` command."""
    add_train(sub)
    add_eval(sub)
