"""The two figures a model card links: the training curve and a 2-D map of validation embeddings.

Both are written as PNG next to README.md. matplotlib runs on the Agg backend (no display).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

X_COLUMNS = ("epoch", "step")
ACCURACY_HINTS = ("knn", "acc", "top1")


def read_metrics_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a run's ``metrics.csv`` (header row first)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _column(rows: Sequence[dict[str, str]], name: str) -> tuple[list[float], list[float], str] | None:
    x_name = next((c for c in X_COLUMNS if rows and c in rows[0]), None)
    if x_name is None:
        return None
    xs, ys = [], []
    for r in rows:
        try:
            x, y = float(r[x_name]), float(r[name])
        except (KeyError, TypeError, ValueError):
            continue  # blank cell: this row did not log the metric
        xs.append(x)
        ys.append(y)
    return (xs, ys, x_name) if xs else None


def plot_training_curve(rows: Sequence[dict[str, str]], out: Path, *, title: str = "Training curve") -> Path | None:
    """Loss (left axis) and accuracy columns such as kNN top-1 (right axis) against epoch/step.

    Returns None, writing nothing, when the rows hold no plottable loss or accuracy.
    """
    if not rows:
        return None
    columns = list(rows[0])
    loss_cols = [c for c in columns if "loss" in c.lower()]
    acc_cols = [c for c in columns if any(h in c.lower() for h in ACCURACY_HINTS)]
    series = {c: s for c in loss_cols + acc_cols if (s := _column(rows, c)) is not None}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    x_label = next(iter(series.values()))[2]
    for c in loss_cols:
        if c in series:
            ax.plot(series[c][0], series[c][1], label=c)
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    accs = [c for c in acc_cols if c in series]
    if accs:
        ax2 = ax.twinx()
        for c in accs:
            ax2.plot(series[c][0], series[c][1], linestyle="--", marker=".", label=c)
        ax2.set_ylabel("accuracy")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def pca_2d(embeddings: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, 2]: projection on the two leading principal components."""
    x = embeddings.astype(np.float64) - embeddings.mean(axis=0, keepdims=True)  # [N, D]
    _, _, vt = np.linalg.svd(x, full_matrices=False)  # vt: [min(N, D), D]
    return (x @ vt[:2].T).astype(np.float32)  # [N, 2]


def plot_projection(
    embeddings: np.ndarray, labels: np.ndarray, class_names: Sequence[str], out: Path, *, title: str
) -> Path:
    """Scatter of the 2-D PCA of ``embeddings`` [N, D], one colour per class in ``labels`` [N]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = pca_2d(embeddings)  # [N, 2]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c, name in enumerate(class_names):
        sel = labels == c
        if sel.any():
            ax.scatter(points[sel, 0], points[sel, 1], s=6, color=cmap(c % cmap.N), label=name)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    if len(class_names) <= 20:
        ax.legend(markerscale=3, fontsize="small", loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
