"""Recall@10 against exact search and queries/s of FAISS indexes, side by side in one run.

Two data sets:
  * synthetic: N clustered unit vectors of dimension D (Gaussian blobs around random centres,
    then L2-normalised) -- *synthetic*, a stand-in for a large gallery; queries are fresh draws;
  * cifar: real embeddings of the offline CIFAR-10 copy (50,000 JPEGs) by an exported encoder.

For each index: build time, recall@10 vs exact inner-product search, and queries/s measured two
ways: one query per call (what the Triton search model sees at low load) and one batch of all
queries (throughput). The goal checked for `auto` at 1M: recall@10 >= 0.95 at >= 20x Flat q/s.

    python benchmarks/index.py                      # 1M x 512 synthetic + CIFAR-10 (~10 min, 2 cores)
    python benchmarks/index.py --n 20000 --cifar 0  # tiny, for CI
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]


def clustered(n: int, dim: int, clusters: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors [n, dim] float32 around ``clusters`` random centres, made in chunks (memory)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)] + 0.9 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """Ground truth ids [Q, k] by brute force, with Flat's batch and single-query q/s."""
    import faiss

    t = time.perf_counter()
    _, ids = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    batch_qps = len(queries) / (time.perf_counter() - t)
    n_single = min(len(queries), 20)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query per call, one thread: as the Triton search model runs
    t = time.perf_counter()
    for q in queries[:n_single]:
        faiss.knn(q[None], base, k, metric=faiss.METRIC_INNER_PRODUCT)
    single_qps = n_single / (time.perf_counter() - t)
    faiss.omp_set_num_threads(threads)
    return ids, batch_qps, single_qps


def measure(factory: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int) -> dict[str, float | str]:
    """Build ``factory`` (through GalleryIndex, as `ascl index build` does) and measure it."""
    from ascl.serving.collections.faiss_index import GalleryIndex, apply_search_params

    t = time.perf_counter()
    index = GalleryIndex.create(base.shape[1], factory)
    index.train_if_needed(base)
    index.index.add_with_ids(base, np.arange(len(base), dtype=np.int64))
    apply_search_params(index.index)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    _, ids = index.index.search(queries, k)
    batch_qps = len(queries) / (time.perf_counter() - t)
    import faiss

    n_single = min(len(queries), 300)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    for q in queries[:n_single]:
        index.index.search(q[None], k)
    single_qps = n_single / (time.perf_counter() - t)
    faiss.omp_set_num_threads(threads)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth, strict=True)]))
    return {"factory": factory, "build_s": round(build_s, 1), "recall_at_10": round(recall, 4),
            "qps_single": round(single_qps, 1), "qps_batch": round(batch_qps, 1)}


def run_set(name: str, base: np.ndarray, queries: np.ndarray, factories: list[str], k: int) -> dict[str, object]:
    from ascl.serving.collections.faiss_index import auto_factory

    auto = auto_factory(len(base), base.shape[1])
    print(f"[{name}] N={len(base)} D={base.shape[1]} queries={len(queries)} auto={auto}", flush=True)
    truth, flat_batch, flat_single = exact(base, queries, k)
    rows: list[dict[str, float | str]] = [{"factory": "Flat (exact)", "build_s": 0.0, "recall_at_10": 1.0,
                                           "qps_single": round(flat_single, 1), "qps_batch": round(flat_batch, 1)}]
    print(f"  {rows[0]}", flush=True)
    for factory in dict.fromkeys([*factories, auto]):
        if factory == "Flat":
            continue
        row = measure(factory, base, queries, truth, k)
        row["speedup_single_vs_flat"] = round(float(row["qps_single"]) / flat_single, 1)
        row["speedup_batch_vs_flat"] = round(float(row["qps_batch"]) / flat_batch, 1)
        row["auto"] = factory == auto
        rows.append(row)
        print(f"  {row}", flush=True)
    return {"name": name, "n": len(base), "dim": int(base.shape[1]), "auto": auto, "rows": rows}


def cifar_embeddings(model: str | None, limit: int, tmp: Path) -> np.ndarray:
    """Embed the CIFAR-10 copy with ``model`` (default: a seeded random-init ResNet-18 export)."""
    from ascl.serving.collections.build import embed_source
    from ascl.serving.collections.model_files import resolve_onnx

    if model is None:
        import torch

        from ascl.encoder import Encoder
        from ascl.export.onnx_export import export_onnx

        torch.manual_seed(0)
        onnx_path = export_onnx(Encoder().eval(), tmp / "random_resnet18.onnx")
    else:
        onnx_path = resolve_onnx(model)
    vectors, _, _ = embed_source(onnx_path, "cifar10-offline", known=set(), limit=limit, progress=True)
    return vectors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic gallery size")
    parser.add_argument("--dim", type=int, default=512, help="embedding dim (ResNet-18: 512)")
    parser.add_argument("--queries", type=int, default=1000, help="queries per data set")
    parser.add_argument("--factories", default="HNSW32", help="semicolon-separated factories besides Flat and auto")
    parser.add_argument("--hnsw-max-n", type=int, default=300_000,
                        help="skip HNSW above this N (its build at 1M x 512 takes far too long on 2 cores)")
    parser.add_argument("--cifar", type=int, default=50_000, help="CIFAR-10 images to embed (0 skips)")
    parser.add_argument("--model", default=None, help="encoder for the CIFAR set (default: seeded random ResNet-18)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "index.json"), help="results JSON")
    args = parser.parse_args(argv)

    import tempfile

    import faiss

    k = 10
    factories = [f for f in args.factories.split(";") if f]
    results: dict[str, object] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": machine.cpu_name(), "cores": faiss.omp_get_max_threads(),
                    "python": platform.python_version(), "faiss": faiss.__version__},
        "note": "synthetic = clustered random unit vectors (1000 Gaussian blobs), not real images",
        "sets": [],
    }
    sets: list[dict[str, object]] = []
    base = clustered(args.n, args.dim, 1000, seed=0)
    queries = clustered(args.queries, args.dim, 1000, seed=1)
    synthetic_factories = [f for f in factories if not (f.startswith("HNSW") and args.n > args.hnsw_max_n)]
    sets.append(run_set("synthetic", base, queries, synthetic_factories, k))
    del base
    if args.cifar:
        with tempfile.TemporaryDirectory() as tmp:
            vectors = cifar_embeddings(args.model, args.cifar, Path(tmp))
        rng = np.random.default_rng(0)
        pick = rng.choice(len(vectors), size=min(args.queries, len(vectors) // 10), replace=False)
        mask = np.ones(len(vectors), bool)
        mask[pick] = False
        ivf = f"IVF{max(64, int(np.sqrt(mask.sum())) // 64 * 64)},PQ{args.dim // 2}x4fs,Refine(SQ8)"
        sets.append(run_set("cifar10-embeddings", vectors[mask], vectors[pick], [*factories, ivf], k))
    results["sets"] = sets
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
