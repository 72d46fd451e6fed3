"""Load test: `image_search` through `ascl serve`'s service, for the default model and a comparison
model, and a naive PyTorch server for reference.

Every system serves the same FAISS gallery (each with its own model's embeddings), one image per
request, k=10, driven by the same async client loop for a fixed time at concurrency 1, 8 and 32,
one system at a time:

  * triton:   the service `ascl serve` runs (front door on the public ports, the embedded
              `tritonserver` behind it) with ``--model`` (default: the shipped default), requests
              through gRPC (`tritonclient.grpc.aio`), real CIFAR-10 JPEGs as encoded bytes;
  * compare:  the same service with ``--compare`` (default: a seeded random ResNet-18 at width 64,
              the network the default replaced), so the serving rate of the two networks is
              measured side by side in one run (`summary.qps_ratio_vs_compare`);
  * baseline: a stdlib ThreadingHTTPServer in its own process, decode + PyTorch eager forward
              per request (no batching) + the same FAISS search, requests through aiohttp.

    python benchmarks/serve_load.py                         # 20 s per level (about 5 min)
    python benchmarks/serve_load.py --duration 3 --gallery 500 --compare '' --no-baseline   # quick check

Goals (2-core CPU): triton q/s >= 3x baseline at concurrency 32, zero errors, and p99 latency at
concurrency 8 no worse than the baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import RANDOM_W64, load_benchmark_encoder  # noqa: E402


def query_images(n: int) -> list[bytes]:
    """Real JPEGs from the CIFAR-10 copy: the last ``n`` of the first 10,000 (not in a small gallery)."""
    from ascl.image_sources import iter_images

    items = list(iter_images("cifar10-offline", limit=10_000))[-n:]
    return [item.read() for item in items]


# ---------------------------------------------------------------- naive baseline (own process)

def serve_baseline(port: int, index_dir: str, model: str) -> None:
    """One HTTP endpoint: POST image bytes -> decode, eager forward at batch 1, FAISS search, JSON."""
    import torch

    from ascl.images import ImageError, decode_image
    from ascl.serving.index import GalleryIndex

    encoder = load_benchmark_encoder(model)
    index = GalleryIndex.load(index_dir)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                pixels = torch.from_numpy(decode_image(body, encoder.image_size).copy())[None]  # [1, S, S, 3]
                with torch.no_grad():
                    emb = encoder.embed_uint8(pixels).numpy()  # [1, D]
                hits = index.hits(emb, 10)[0]
                payload = json.dumps([{"id": h.id, "score": h.score, "metadata": h.metadata} for h in hits]).encode()
                self.send_response(200)
            except (ImageError, ValueError) as exc:
                payload = json.dumps({"error": str(exc)}).encode()
                self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


# ---------------------------------------------------------------- load generator

async def drive(send: Callable[[bytes], Awaitable[None]], images: list[bytes], concurrency: int,
                duration: float) -> dict[str, Any]:
    """``concurrency`` workers send back-to-back requests for ``duration`` seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + duration

    async def worker(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                await send(images[i % len(images)])
                latencies.append(time.perf_counter() - t)
            except Exception as exc:  # counted and reported, never hidden
                errors.append(str(exc)[:200])
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "qps": round(len(latencies) / elapsed, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "first_error": errors[0] if errors else ""}


async def load_triton(url: str, images: list[bytes], levels: list[int], duration: float) -> list[dict[str, Any]]:
    import tritonclient.grpc.aio as aio
    from tritonclient.grpc import InferInput

    from ascl import names

    client = aio.InferenceServerClient(url)

    async def send(data: bytes) -> None:
        inp = InferInput(names.IMAGE_BYTES, [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        k = InferInput(names.TOP_K, [1, 1], "INT32")
        k.set_data_from_numpy(np.array([[10]], dtype=np.int32))
        result = await client.infer(names.MODEL_IMAGE_SEARCH, [inp, k])
        assert result.as_numpy(names.IDS).shape == (1, 10)

    await drive(send, images, 4, 2.0)  # warm-up, not reported
    rows = [await drive(send, images, c, duration) for c in levels]
    await client.close()
    return rows


async def load_baseline(url: str, images: list[bytes], levels: list[int], duration: float) -> list[dict[str, Any]]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def send(data: bytes) -> None:
            async with session.post(url, data=data) as resp:
                hits = await resp.json()
                if resp.status != 200 or len(hits) != 10:
                    raise RuntimeError(f"HTTP {resp.status}: {hits}")

        await drive(send, images, 4, 2.0)
        return [await drive(send, images, c, duration) for c in levels]


def wait_http(url: str, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=2)
            return
        except Exception as exc:  # 400 (not an image) means it is up
            if "400" in str(exc):
                return
            time.sleep(0.5)
    raise RuntimeError(f"baseline server at {url} did not come up")


def serve_model(model: str, images: list[bytes], levels: list[int], args: argparse.Namespace,
                tmp: Path) -> tuple[list[dict[str, Any]], Path, str]:
    """Export ``model``, index the gallery with it, serve it through the service; the load rows."""
    from ascl.export.onnx_export import export_onnx
    from ascl.serving.build import build_index
    from ascl.serving.repository import write_repository
    from ascl.serving.service import SearchService, free_local_port

    encoder = load_benchmark_encoder(model)
    folder = tmp / f"{len(list(tmp.iterdir()))}"
    folder.mkdir()
    onnx_path = export_onnx(encoder, folder / "encoder.onnx")
    build_index(onnx_path, "cifar10-offline", folder / "idx", limit=args.gallery, progress=False)
    repo = write_repository(folder / "models", onnx_path, folder / "idx")
    with SearchService(repo, grpc_port=free_local_port(), http_port=free_local_port(),
                       metrics_port=free_local_port(), log=lambda text: None) as service:
        print(f"{model}: serving at {service.grpc_url}", flush=True)
        rows = asyncio.run(load_triton(service.grpc_url, images, levels, args.duration))
    for row in rows:
        print(f"{model:>24}", row, flush=True)
    described = f"{encoder.arch} width {encoder.width} ({encoder.embedding_dim}-d), {model}"
    return rows, folder / "idx", described


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="encoder spec (default: the shipped default)")
    parser.add_argument("--compare", default=RANDOM_W64,
                        help=f"a second encoder served in the same run, or '' for none (default: {RANDOM_W64})")
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive PyTorch server")
    parser.add_argument("--gallery", type=int, default=5000, help="CIFAR-10 images in the served index")
    parser.add_argument("--queries", type=int, default=256, help="distinct query images (cycled)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"), help="results JSON")
    parser.add_argument("--baseline-server", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--index", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server is not None:
        serve_baseline(args.baseline_server, args.index, args.model)
        return 0

    from ascl.serving.service import free_local_port

    levels = [int(c) for c in args.levels.split(",")]
    images = query_images(args.queries)
    load_before = os.getloadavg()
    compare: list[dict[str, Any]] = []
    baseline: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        triton, index_dir, described = serve_model(args.model, images, levels, args, tmp)
        compare_described = None
        if args.compare:
            compare, _, compare_described = serve_model(args.compare, images, levels, args, tmp)
        if not args.no_baseline:
            port = free_local_port()
            cmd = [sys.executable, __file__, "--baseline-server", str(port), "--index", str(index_dir),
                   "--model", args.model]
            proc = subprocess.Popen(cmd)
            try:
                wait_http(f"http://127.0.0.1:{port}/search")
                baseline = asyncio.run(load_baseline(f"http://127.0.0.1:{port}/search", images, levels, args.duration))
            finally:
                proc.terminate()
                proc.wait()
            for row in baseline:
                print("baseline", row, flush=True)

    summary: dict[str, Any] = {"triton_errors": sum(int(r["errors"]) for r in triton)}
    by_c = {r["concurrency"]: r for r in triton}
    if compare:
        summary["qps_ratio_vs_compare"] = {str(c["concurrency"]): round(by_c[c["concurrency"]]["qps"] / max(c["qps"], 1e-9), 2)
                                           for c in compare}
        summary["compare_errors"] = sum(int(r["errors"]) for r in compare)
    base_by_c = {r["concurrency"]: r for r in baseline}
    if 32 in by_c and 32 in base_by_c:
        summary["qps_ratio_at_32_vs_baseline"] = round(by_c[32]["qps"] / max(base_by_c[32]["qps"], 1e-9), 2)
    if 8 in by_c and 8 in base_by_c:
        summary["p99_ms_at_8"] = {"triton": by_c[8]["p99_ms"], "baseline": base_by_c[8]["p99_ms"]}
    import torch

    from ascl.atomic import atomic_write_text

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(
            ["serve_load.py", *argv]),
        "machine": {"cpu": machine.cpu_name(), "cpu_simd": machine.cpu_simd_flags(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version(), "gpu": None},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "setup": {"gallery": args.gallery, "queries": args.queries, "duration_s": args.duration,
                  "model": described, "compare": compare_described, "k": 10, "images_per_request": 1,
                  "served_through": "SearchService (front door + supervised embedded tritonserver), gRPC"},
        "triton": triton, "compare": compare, "baseline": baseline, "summary": summary,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary), f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
