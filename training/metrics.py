"""Run metrics: a CSV (one row per log step), TensorBoard scalars, and a PNG of the curves.

``read_metrics`` and ``plot_curves`` are the one reader of a run's ``metrics.csv`` and the one
training-curve plotter: ``ascl train`` draws ``curves.png`` with them, and the model card
(``ascl push``) plots the curve of a run that has none.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ascl.atomic import atomic_write_text

# elapsed_s: training wall time so far (kNN monitoring excluded), summed over resumed sittings
COLUMNS = ("step", "epoch", "loss", "lr", "pairs_per_s", "knn_top1", "elapsed_s")
X_COLUMNS = ("step", "epoch")  # the x axis of the curves: the first one the CSV has
# The panels of the curves: (this project's column, its title, the title for other columns, what
# other columns' names contain), so that CSVs of other tools ('train_loss', 'val_acc') plot too.
PANELS = (
    ("loss", "training loss", "loss", ("loss",)),
    ("lr", "learning rate", "learning rate", ()),
    ("knn_top1", "kNN top-1 (val)", "accuracy", ("knn", "acc", "top1")),
)


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Rows of ``metrics.csv`` as dicts of strings (empty when the file is absent)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
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


def _panels(columns: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(title, columns) of each panel that has columns in the CSV, in ``PANELS`` order."""
    panels = []
    for own, own_title, other_title, hints in PANELS:
        cols = [c for c in columns if c == own or any(h in c.lower() for h in hints)]
        if cols:
            panels.append((own_title if cols == [own] else other_title, cols))
    return panels


def _series(rows: Sequence[dict[str, str]], x_name: str, name: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        try:
            x, y = float(r[x_name]), float(r[name])
        except (KeyError, TypeError, ValueError):
            continue  # blank cell: this row did not log the metric
        xs.append(x)
        ys.append(y)
    return xs, ys


def plot_curves(
    metrics: str | Path | Sequence[dict[str, str]], png_path: Path, *, title: str | None = None,
    x: str | None = None,
) -> Path | None:
    """Loss, lr and kNN top-1 against step, one panel each, as one PNG (matplotlib Agg).

    ``metrics``: a ``metrics.csv`` path or its rows (``read_metrics``). Columns other tools name
    differently land in the panel their name fits (``PANELS``); ``x`` is the x-axis column
    (None: ``step``, else ``epoch``); ``title`` goes above the panels. A panel whose columns are
    absent from the CSV is left out. Returns None, writing nothing, when nothing can be plotted.
    """
    rows = read_metrics(Path(metrics)) if isinstance(metrics, str | Path) else list(metrics)
    if not rows:
        return None
    columns = list(rows[0])
    x_name = x or next((c for c in X_COLUMNS if c in columns), None)
    if x_name is None:
        return None
    panels = _panels(columns)
    series = {c: _series(rows, x_name, c) for _, cols in panels for c in cols}
    if not any(xs for xs, _ in series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(13 * len(panels) / 3, 3.6), squeeze=False)
    for ax, (name, cols) in zip(axes[0], panels, strict=True):
        for c in cols:
            xs, ys = series[c]
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=c)
        if len(cols) > 1:
            ax.legend(fontsize="small", loc="best")
        ax.set_title(name)
        ax.set_xlabel(x_name)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
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
