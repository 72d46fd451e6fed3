"""Does an exported model compute what PyTorch computes? Pure metrics plus the check itself.

fp32 graphs must reproduce eager PyTorch embedding by embedding (cosine >= 0.9999 at batch 1 and
at a large batch). Reduced-precision graphs (fp16, int8) cannot, so they are judged by what
retrieval sees: how many of each image's top-10 neighbours under fp32 they keep (recall@10 vs
fp32) on a real gallery, and the leave-one-out kNN top-1 accuracy of both when labels exist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

FP32_MIN_COSINE = 0.9999
MIN_RECALL_AT_10 = {"fp16": 0.98, "int8": 0.95}
NEIGHBOURS = 10

Embed = Callable[[np.ndarray], np.ndarray]  # uint8 [N, S, S, 3] -> float32 [N, D]


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows. a, b: [N, D] -> [N]."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return num / np.maximum(den, 1e-12)


def top_k_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k most similar other rows (self excluded). [N, D] -> [N, k]."""
    sim = embeddings.astype(np.float64) @ embeddings.astype(np.float64).T  # [N, N]
    np.fill_diagonal(sim, -np.inf)
    k = min(k, embeddings.shape[0] - 1)
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # [N, k] unordered
    order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def recall_at_k(reference: np.ndarray, candidate: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Mean fraction of each row's reference top-k neighbours that the candidate also ranks in
    its top-k. reference, candidate: [N, D] -> scalar in [0, 1]."""
    ref = top_k_neighbours(reference, k)  # [N, k]
    cand = top_k_neighbours(candidate, k)  # [N, k]
    hits = [len(np.intersect1d(r, c, assume_unique=True)) for r, c in zip(ref, cand, strict=True)]
    return float(np.mean(hits) / ref.shape[1])


def knn_top1(embeddings: np.ndarray, labels: np.ndarray, k: int = 20, temperature: float = 0.1) -> float:
    """Leave-one-out weighted kNN accuracy (the paper's protocol: weights exp(sim / t)).
    embeddings: [N, D] unit norm, labels: [N] int -> accuracy in [0, 1]."""
    idx = top_k_neighbours(embeddings, k)  # [N, k]
    sim = np.take_along_axis(embeddings @ embeddings.T, idx, axis=1)  # [N, k]
    weights = np.exp(sim / temperature)  # [N, k]
    n_classes = int(labels.max()) + 1
    votes = np.zeros((embeddings.shape[0], n_classes))  # [N, C]
    np.add.at(votes, (np.arange(embeddings.shape[0])[:, None], labels[idx]), weights)
    return float((votes.argmax(axis=1) == labels).mean())


def embed_in_batches(embed: Embed, images: np.ndarray, batch: int) -> np.ndarray:
    """Run ``embed`` over [N, S, S, 3] in chunks of ``batch`` -> [N, D]."""
    return np.concatenate([embed(images[i : i + batch]) for i in range(0, len(images), batch)])


@dataclass
class ParityReport:
    """What one verification measured; ``passed`` says whether it met its tolerance."""

    precision: str
    images: int
    source: str
    batch_sizes: list[int]
    min_cosine: float
    max_abs_error: float
    recall_at_10: float | None = None
    min_recall_at_10: float | None = None
    knn_top1_reference: float | None = None
    knn_top1_candidate: float | None = None
    passed: bool = False
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        parts = [
            f"{self.precision}: {'PASS' if self.passed else 'FAIL'} on {self.images} images ({self.source})",
            f"batches {self.batch_sizes}",
            f"min cosine {self.min_cosine:.6f}",
            f"max abs error {self.max_abs_error:.2e}",
        ]
        if self.recall_at_10 is not None:
            parts.append(f"recall@10 vs fp32 {self.recall_at_10:.4f} (need >= {self.min_recall_at_10})")
        if self.knn_top1_reference is not None:
            parts.append(f"kNN top-1 fp32 {self.knn_top1_reference:.4f} vs {self.knn_top1_candidate:.4f}")
        return ", ".join(parts) + "".join(f"\n  - {p}" for p in self.problems)


def compare(
    reference: np.ndarray,
    candidate: Embed,
    images: np.ndarray,
    *,
    precision: str,
    source: str,
    labels: np.ndarray | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    min_recall: float | None = None,
) -> ParityReport:
    """Judge ``candidate`` against ``reference`` [N, D] (eager fp32 embeddings of ``images``).

    The candidate runs at every batch size in ``batch_sizes`` (batch 1 over the first 16 images,
    to keep it quick); fp32 needs cosine >= FP32_MIN_COSINE everywhere, fp16/int8 need
    recall@10 vs fp32 >= ``min_recall`` (default MIN_RECALL_AT_10[precision]).
    """
    cosines, errors, full = [], [], None
    for batch in batch_sizes:
        n = min(len(images), 16) if batch == 1 else len(images)
        out = embed_in_batches(candidate, images[:n], batch)  # [n, D]
        if out.shape != reference[:n].shape:
            raise ValueError(f"candidate returned {out.shape}, reference is {reference[:n].shape}")
        cosines.append(float(row_cosine(out, reference[:n]).min()))
        errors.append(float(np.abs(out - reference[:n]).max()))
        if n == len(images):
            full = out
    if full is None:
        full = embed_in_batches(candidate, images, max(batch_sizes))
    report = ParityReport(precision, len(images), source, list(batch_sizes), min(cosines), max(errors))
    if not np.isfinite(full).all():
        report.problems.append("the exported model returned NaN or inf")
    if precision == "fp32":
        if report.min_cosine < FP32_MIN_COSINE:
            report.problems.append(f"min cosine {report.min_cosine:.6f} < {FP32_MIN_COSINE}")
    else:
        report.min_recall_at_10 = MIN_RECALL_AT_10.get(precision, 0.95) if min_recall is None else min_recall
        report.recall_at_10 = recall_at_k(reference, full)
        if report.recall_at_10 < report.min_recall_at_10:
            report.problems.append(
                f"recall@10 vs fp32 {report.recall_at_10:.4f} < {report.min_recall_at_10}"
            )
    if labels is not None and precision != "fp32" and len(np.unique(labels)) > 1:
        report.knn_top1_reference = knn_top1(reference, labels)
        report.knn_top1_candidate = knn_top1(full, labels)
    report.passed = not report.problems
    return report
