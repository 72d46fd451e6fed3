"""The card's own figure, a 2-D map of validation embeddings, and the training curve it reuses.

Both are written as PNG next to README.md, with matplotlib on the Agg backend (no display). The
training curve is training's one plotter, ``ascl.training.metrics.plot_curves`` (the one reader
of ``metrics.csv`` is ``read_metrics`` beside it); the card passes its own title.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ascl.training.metrics import save_png


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
    save_png(fig, out, dpi=120)
    return out
