"""Short training trials that choose a CPU recipe: ``--recipe cifar`` for
``training/configs/cifar10_cpu.yaml``, ``--recipe photo`` for ``imagenette_cpu.yaml``.

Each trial is one ``ascl train --config <recipe's config>`` run with its own overrides (width,
image size, batch, lr, epochs, queue, bf16), a complete warm-up + cosine schedule over its few
epochs, and the kNN monitor during it (CIFAR: k=200, t=0.1, a 10,000-image bank from the
training split, all 5,000 validation images; photos: k=20, t=0.1, the whole training split as
bank, the held-out 10% of each class as queries). The record keeps, per trial, kNN top-1
against training minutes (``elapsed_s`` of ``metrics.csv``: training wall time, kNN excluded),
so trials of different widths and sizes are compared at equal time. Trials run one after
another in fresh processes; a finished trial is read back instead of rerun, so the script can
be stopped and started again. Run it on a quiet machine (or pinned to a core nothing else
uses: ``taskset -c 0``): nothing else should share its cores.

  python benchmarks/cpu_recipe_trials.py                         # the CIFAR trials
  python benchmarks/cpu_recipe_trials.py --recipe photo          # the photo trials
  python benchmarks/cpu_recipe_trials.py --only w16-b256-lr06     # one of them
  python benchmarks/cpu_recipe_trials.py --trial mine:model.width=20,epochs=3   # your own

Writes ``benchmarks/results/cpu_recipe_trials.json`` / ``.png`` (CIFAR) or
``photo_recipe_trials.json`` / ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
# name -> overrides of the recipe's shipped config; each schedule spans ~10-15 minutes here
CIFAR_TRIALS: dict[str, list[str]] = {
    "w16-b256-lr06": ["model.width=16", "batch_size=256", "optim.lr_per_256=0.06", "epochs=4"],
    "w32-b256-lr06": ["model.width=32", "batch_size=256", "optim.lr_per_256=0.06", "epochs=2"],
    "w24-b256-lr06": ["model.width=24", "batch_size=256", "optim.lr_per_256=0.06", "epochs=3"],
    "w16-b128-lr12": ["model.width=16", "batch_size=128", "optim.lr_per_256=0.12", "epochs=4"],
    "w16-b256-lr12": ["model.width=16", "batch_size=256", "optim.lr_per_256=0.12", "epochs=4"],
    "w16-b256-lr06-q16k": ["model.width=16", "batch_size=256", "optim.lr_per_256=0.06", "epochs=4",
                           "moco.queue_size=16384"],
}
# one core (taskset -c 0, one thread), ~8 minutes each; every trial keeps 160-px photos and crops of them
PHOTO_TRIALS: dict[str, list[str]] = {
    "w16-128-bf16": ["amp=bf16", "epochs=10"],
    "w16-128-fp32": ["amp=off", "epochs=7"],
    "w16-96-bf16": ["amp=bf16", "data.image_size=96", "epochs=18"],
    "w24-128-bf16": ["amp=bf16", "model.width=24", "epochs=5"],
    "w16-128-bf16-b256": ["amp=bf16", "batch_size=256", "epochs=10"],
    "w16-128-bf16-q8k": ["amp=bf16", "moco.queue_size=8192", "epochs=10"],
}
RECIPES: dict[str, dict[str, Any]] = {
    "cifar": {"config": "cifar10_cpu", "trials": CIFAR_TRIALS, "out": "cpu_recipe_trials.json",
              "common": ["eval.knn_every=1", "eval.knn_train_subset=10000", "optim.warmup_epochs=0.5",
                         "checkpoint_every=100"],
              "knn": "k=200, t=0.1, bank: 10,000 images of the train split, queries: val split",
              "title": "CPU recipe trials: MoCo-v2 + ASCL on CIFAR-10"},
    "photo": {"config": "imagenette_cpu", "trials": PHOTO_TRIALS, "out": "photo_recipe_trials.json",
              "common": ["eval.knn_every=2", "optim.warmup_epochs=0.5", "checkpoint_every=100"],
              "knn": "k=20, t=0.1, bank: the train split (90% of each class), queries: the held-out 10%",
              "title": "Photo recipe trials: MoCo-v2 + ASCL on Imagenette (one core)"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="cifar", choices=sorted(RECIPES),
                   help="which recipe's trials: cifar (cifar10_cpu) or photo (imagenette_cpu) (default: cifar)")
    p.add_argument("--only", action="append", default=[], help="run only these trial names (repeatable)")
    p.add_argument("--trial", action="append", default=[], metavar="NAME:KEY=V,KEY=V",
                   help="an extra trial: its name and config overrides")
    p.add_argument("--runs", default=str(ROOT / "runs" / "trials"), help="where the trial run folders go")
    p.add_argument("--data", default="", help="dataset spec (default: the config's, the offline CIFAR-10 copy)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override applied to every trial (e.g. for a smoke test)")
    p.add_argument("--out", default="", help="results JSON (default: benchmarks/results/<recipe's file>)")
    args = p.parse_args(argv)
    args.out = args.out or str(ROOT / "benchmarks" / "results" / RECIPES[args.recipe]["out"])
    return args


def trial_list(args: argparse.Namespace) -> dict[str, list[str]]:
    trials = dict(RECIPES[args.recipe]["trials"])
    for text in args.trial:
        name, _, sets = text.partition(":")
        if not name or not sets:
            raise SystemExit(f"--trial {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
        trials[name] = sets.split(",")
    if args.only:
        missing = [n for n in args.only if n not in trials]
        if missing:
            raise SystemExit(f"unknown trial(s) {missing}; known: {sorted(trials)}")
        trials = {n: trials[n] for n in args.only}
    return trials


def summarise(run_dir: Path) -> dict[str, Any]:
    """kNN points (epoch, minutes, top-1) and the mean training rate of a finished trial."""
    from ascl.training.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.csv")
    knn = [{"epoch": float(r["epoch"]), "minutes": round(float(r["elapsed_s"]) / 60, 2),
            "knn_top1": round(float(r["knn_top1"]), 4)} for r in rows if r.get("knn_top1") and r.get("elapsed_s")]
    rates = [float(r["pairs_per_s"]) for r in rows if r.get("pairs_per_s")]
    return {"knn": knn, "pairs_per_s_median": round(sorted(rates)[len(rates) // 2], 1) if rates else None,
            "final_knn_top1": knn[-1]["knn_top1"] if knn else None, "minutes": knn[-1]["minutes"] if knn else None}


def run_trial(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(args.runs) / name
    recipe = RECIPES[args.recipe]
    sets = [*recipe["common"], *overrides, *args.set]
    cmd = [sys.executable, "-m", "ascl", "train", "--config", recipe["config"], "--out", str(run_dir), "--no-progress"]
    if args.data:
        cmd += ["--data", args.data]
    for s in sets:
        cmd += ["--set", s]
    done = (run_dir / "done").is_file()
    if not done:
        resume = ["--resume", str(run_dir)] if (run_dir / "checkpoints" / "last.pt").is_file() else []
        print(f"trial {name}: {shlex.join(sets)}", flush=True)
        subprocess.run(cmd + resume, check=True, cwd=ROOT)
        (run_dir / "done").write_text("ok\n")
    result = {"name": name, "overrides": overrides, "command": shlex.join(["ascl", *cmd[3:]]), **summarise(run_dir)}
    print(f"trial {name}: kNN top-1 {result['final_knn_top1']} after {result['minutes']} min "
          f"({result['pairs_per_s_median']} pairs/s)", flush=True)
    return result


def plot(record: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ascl.training.metrics import save_png

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for trial in record["trials"]:
        pts = trial["knn"]
        ax.plot([p["minutes"] for p in pts], [100 * p["knn_top1"] for p in pts], marker="o", label=trial["name"])
    ax.set_xlabel(f"training minutes ({record.get('cores', '2-core CPU')})")
    ax.set_ylabel("kNN top-1 on the val split (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ascl.atomic import atomic_write_text

    started = time.time()
    load_before = os.getloadavg()
    results = [run_trial(name, sets, args) for name, sets in trial_list(args).items()]
    recipe = RECIPES[args.recipe]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    record = {
        "benchmark": "cpu_recipe_trials", "cpu": machine.cpu_name(), "cpu_simd": machine.cpu_simd_flags(),
        "cpu_count": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.time() - started, 1),
        "recipe": args.recipe, "config": recipe["config"], "cores": f"{cores} of {os.cpu_count()} cores",
        "common_overrides": recipe["common"], "knn": recipe["knn"],
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["cpu_recipe_trials.py", *argv]),
        "trials": results,
    }
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    kept = [t for t in previous.get("trials", []) if t["name"] not in {r["name"] for r in results}]
    record["trials"] = kept + results
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    plot(record, out.with_suffix(".png"), recipe["title"])
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
