"""Run metrics: a CSV (one row per log step), TensorBoard scalars, and a PNG of the curves."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ascl.atomic import atomic_write_text

# elapsed_s: training wall time so far (kNN monitoring excluded), summed over resumed sittings
COLUMNS = ("step", "epoch", "loss", "lr", "pairs_per_s", "knn_top1", "elapsed_s")


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Rows of ``metrics.csv`` as dicts of strings (empty when the file is absent)."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class MetricsWriter:
    """Appends to ``metrics.csv`` and TensorBoard; on resume, drops rows logged after the checkpoint."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.csv_path = run_dir / "metrics.csv"
        keep = [r for r in read_metrics(self.csv_path) if resume_step is not None and int(r["step"]) <= resume_step]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(keep)
        atomic_write_text(self.csv_path, buf.getvalue())
        self.tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, epoch: float, **values: float) -> None:
        row: dict[str, Any] = {"step": step, "epoch": f"{epoch:.4f}"}
        row.update({k: f"{v:.6g}" for k, v in values.items()})
        with open(self.csv_path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=COLUMNS).writerow(row)
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(f"train/{name}" if name != "knn_top1" else "eval/knn_top1", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(csv_path: Path, png_path: Path) -> Path | None:
    """Loss, lr and kNN top-1 against step, as one PNG (matplotlib Agg); None if nothing logged."""
    rows = read_metrics(csv_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("loss", "training loss"), ("lr", "learning rate"), ("knn_top1", "kNN top-1 (val)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, names, strict=True):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, png_path, dpi=100)
    return png_path


def save_png(fig: Any, path: Path, *, dpi: int = 100) -> None:
    """Render a matplotlib figure to PNG, write it atomically, and close the figure."""
    import matplotlib.pyplot as plt

    from ascl.atomic import atomic_write_bytes

    with io.BytesIO() as buf:
        fig.savefig(buf, format="png", dpi=dpi)
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())
