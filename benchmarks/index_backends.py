"""FAISS against Milvus behind the index interface, side by side in one run on the same vectors.

For each size N (synthetic: clustered random unit vectors, ``index.clustered``; not real images)
and each backend (a FAISS folder, a Milvus collection; both with their ``auto`` index type for N,
and the exact FLAT / Flat for reference), through ``ascl.serving.collections.index`` only:

  * insert rate: vectors/s of one ``writing`` block that adds all N (Milvus: plus the seconds to
    seal and index them, ``milvus_index.seal``);
  * recall@10 against exact inner-product search;
  * queries/s of one-query searches at concurrency 1 and 16 (threads of one process, as the
    Triton search model's instances would call it), and the same under a filter that keeps 1% of
    the entries (``label`` has 100 values), with that filter's recall@10.

Milvus: ``--milvus HOST:PORT`` of a running server, or (default) the standalone server of the
PyPI ``milvus`` package started here on free ports with its data under a temporary folder. The
results (with the machine: CPU, SIMD flags, load average) go to ``benchmarks/results/``.

    python benchmarks/index_backends.py                       # 100k and 1M x 128 (the lead's timed run)
    python benchmarks/index_backends.py --sizes 3000 --queries 50 --seconds 1 --out /tmp/smoke.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from index import clustered  # noqa: E402  (benchmarks/index.py: the one synthetic gallery)

LABELS = 100  # a filter on one label keeps 1% of the entries
MODEL = {"name": "benchmark", "weights": "sha256:" + "0" * 64, "precision": "fp32"}


def records(n: int) -> list[dict[str, Any]]:
    return [{"path": f"{i}.png", "label": f"l{i % LABELS}", "sha1": f"{i:040x}"} for i in range(n)]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / max(len(t), 1) for f, t in zip(found.tolist(), truth.tolist(),
                                                                               strict=True)]))


def rate(index: Any, queries: np.ndarray, threads: int, seconds: float, where: Any = None) -> float:
    """One-query searches per second with ``threads`` callers for about ``seconds``."""
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def run(slot: int) -> None:
        j = slot
        while time.perf_counter() < stop:
            index.search(queries[j % len(queries)][None], 10, where)
            done[slot] += 1
            j += threads

    began = time.perf_counter()
    workers = [threading.Thread(target=run, args=(s,)) for s in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - began)


def measure(spec: Any, factory: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray,
            truth_filtered: np.ndarray, seconds: float, concurrency: list[int]) -> dict[str, Any]:
    from ascl.serving.collections import milvus_index
    from ascl.serving.collections.index import NewIndex, open_index, writing

    model = {**MODEL, "dim": base.shape[1]}
    began = time.perf_counter()
    with writing(spec, who="benchmark", create=NewIndex(base.shape[1], model, factory, len(base)), model=model) as w:
        w.add(base, records(len(base)))
    insert_s = time.perf_counter() - began
    row: dict[str, Any] = {"factory": factory, "insert_vectors_per_s": len(base) / insert_s, "insert_s": insert_s}
    if isinstance(spec, str):
        began = time.perf_counter()
        milvus_index.seal(spec, timeout_s=3600)
        row["seal_and_index_s"] = time.perf_counter() - began
    index = open_index(spec)
    row["index_type"] = str(index.info().get("factory"))
    _, found = index.search(queries, 10)
    row["recall_at_10"] = recall(found, truth)
    where = {"label": "l0"}
    _, found = index.search(queries, 10, where)
    row["filtered_1pct_recall_at_10"] = recall(found, truth_filtered)
    for c in concurrency:
        row[f"qps_c{c}"] = rate(index, queries, c, seconds)
        row[f"filtered_1pct_qps_c{c}"] = rate(index, queries, c, seconds, where)
    print(f"  {row}", flush=True)
    return row


def start_milvus(root: Path) -> tuple[Any, str]:
    """The PyPI ``milvus`` standalone server on free ports, data under ``root``: (server, HOST:PORT)."""
    import socket

    from milvus import MilvusServer, MilvusServerConfig

    keys = ("etcd_port", "root_coord_port", "proxy_port", "proxy_internal_port", "query_coord_port",
            "query_node_port", "index_coord_port", "index_node_port", "data_coord_port", "data_node_port")
    ports = {}
    for key in keys:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[key] = s.getsockname()[1]
    server = MilvusServer(MilvusServerConfig(data_dir=str(root), **ports))
    server.start()
    return server, f"127.0.0.1:{ports['proxy_port']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated gallery sizes N")
    parser.add_argument("--dim", type=int, default=128, help="embedding dim (the shipped default model: 128)")
    parser.add_argument("--queries", type=int, default=500, help="queries (recall, and cycled for q/s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per q/s measurement")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated numbers of concurrent callers")
    parser.add_argument("--milvus", default=None, metavar="HOST:PORT",
                        help="a running Milvus server; default: start the PyPI milvus standalone server here")
    parser.add_argument("--exact-max-n", type=int, default=200_000,
                        help="also measure FLAT/Flat (exact) up to this N; above it only auto")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "index_backends.json"))
    args = parser.parse_args(argv)

    import faiss
    import pymilvus

    faiss.omp_set_num_threads(1)  # one thread per search call, as in the Triton search model
    sizes = [int(s) for s in args.sizes.split(",") if s]
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    work = Path(tempfile.mkdtemp(prefix="index-backends-"))
    server = None
    try:
        if args.milvus:
            address, server_version = args.milvus, "external"
        else:
            server, address = start_milvus(work / "milvus")
            import milvus

            server_version = f"milvus (PyPI) {milvus.__version__} standalone"
        result: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpu": machine.cpu_name(), "simd": machine.cpu_simd_flags(), "cores": os.cpu_count(),
                        "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
                        "faiss": faiss.__version__, "pymilvus": pymilvus.__version__, "milvus": server_version},
            "note": ("synthetic clustered unit vectors (index.clustered), not real images; Milvus runs on the same "
                     "machine as the client; one-query searches; 1% filter = label == 'l0'"),
            "sizes": [],
        }
        for n in sizes:
            print(f"N = {n} x {args.dim}", flush=True)
            base = clustered(n, args.dim, 1000, seed=0)
            queries = clustered(args.queries, args.dim, 1000, seed=1)
            truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]  # [Q, 10] exact
            kept = np.flatnonzero(np.arange(n) % LABELS == 0)
            truth_filtered = kept[np.argsort(-(queries @ base[kept].T), axis=1)[:, :10]]
            rows = []
            for backend, factories in (("faiss", ["auto", "Flat"]), ("milvus", ["auto", "FLAT"])):
                for factory in factories:
                    if factory != "auto" and n > args.exact_max_n:
                        continue
                    name = f"b{n}_{factory.lower()}"
                    spec: Any = work / name if backend == "faiss" else f"milvus://{address}/{name}"
                    print(f" {backend} {factory}", flush=True)
                    rows.append({"backend": backend, **measure(spec, factory, base, queries, truth, truth_filtered,
                                                               args.seconds, concurrency)})
                    if backend == "milvus":
                        from ascl.serving.collections.milvus_index import drop_index

                        drop_index(spec)
                    else:
                        shutil.rmtree(spec, ignore_errors=True)
            auto = {r["backend"]: r for r in rows if r["factory"] == "auto"}
            ratios = {key: auto["milvus"][key] / auto["faiss"][key] for key in auto["faiss"]
                      if key.startswith(("qps", "filtered_1pct_qps", "insert_vectors"))}
            print(f" milvus / faiss (auto): {json.dumps({k: round(v, 3) for k, v in ratios.items()})}", flush=True)
            result["sizes"].append({"n": n, "dim": args.dim, "rows": rows, "milvus_over_faiss_auto": ratios})
        result["load_average_at_end"] = os.getloadavg()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
