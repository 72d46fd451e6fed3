"""Load test: `image_search` through `ascl serve`'s service, for the default model (fp32 and int8) and a
comparison model, beside the encoder's own engine rate and a naive PyTorch server.

Every system serves the same FAISS gallery (each with its own model's embeddings), one image per
request, k=10, driven by the same async client loop for a fixed time at concurrency 1, 8 and 32,
one system at a time. The client runs in its own process (one per level), as a real client
would: in the benchmark's process it would share a GIL with the service's front door.

  * triton:   the service `ascl serve` runs (front door on the public ports, the embedded
              `tritonserver` behind it) with ``--model`` (default: the shipped default), requests
              through gRPC (`tritonclient.grpc.aio`), real CIFAR-10 JPEGs as encoded bytes;
  * int8:     the same service with `ascl serve --precision int8`: the calibrated int8 export of
              the same model (calibrated on the gallery's source, verified against fp32 and refused
              below recall@10 0.95), serving the same fp32-built index (`summary.int8_qps_ratio_at_32`);
  * engine_only: ONNX Runtime alone on each served ONNX file, with the server's encoder layout
              (its instance count as concurrent sessions, its intra-op threads each, no spinning),
              at the batch sizes the server formed at concurrency 32 (read from Triton's
              statistics for the encoder model: `/v2/models/encoder/stats` on the private port
              with the admin key), weighted like the server's batches; JPEG decode measured
              separately (one thread); `served_over_engine` = served q/s at 32 / that rate;
  * nowait:   an A/B of the dynamic-batching queue delays in the same run: the same fp32 service
              with the Python models not waiting for fuller batches (0 us instead of the encoder's
              2000 and the preprocess and search models' 500; `summary.qps_ratio_nowait_vs_served`:
              3 ms less latency at concurrency 1, smaller encoder batches under load);
  * compare:  the same service with ``--compare`` (default: a seeded random ResNet-18 at width 64,
              the network the default replaced), so the serving rate of the two networks is
              measured side by side in one run (`summary.qps_ratio_vs_compare`);
  * baseline: a stdlib ThreadingHTTPServer in its own process, decode + PyTorch eager forward
              per request (no batching) + the same FAISS search, requests through aiohttp.

The record holds the CPU's name and SIMD flags (`ascl.machine.cpu_simd_flags`: without VNNI/AMX
int8 convolutions reach only ~2x fp32) and the load average before, after and at every level
(a shared machine: quote figures from a quiet one).

    python benchmarks/serve_load.py                         # the full run: 20 s per level, 5,000 images (~10 min)
    python benchmarks/serve_load.py --duration 10 --gallery 2000    # the README's figures (~6 min, quiet machine)
    python benchmarks/serve_load.py --duration 5 --gallery 500 --compare '' --no-baseline   # quick (~3 min)

Goals (2-core CPU): triton q/s >= 3x baseline at concurrency 32, zero errors, p99 latency at
concurrency 8 no worse than the baseline's; fp32 serving >= 90% of its engine; int8 >= 1.7x the
fp32 q/s at concurrency 32 (its ceiling: the int8/fp32 engine ratio, `summary.int8_engine_ratio`).
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
    from ascl.serving.collections.faiss_index import GalleryIndex

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


async def load_triton(url: str, images: list[bytes], levels: list[int], duration: float,
                      warmup_s: float = 2.0) -> list[dict[str, Any]]:
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

    rows = []
    for c in levels:
        await drive(send, images, c, warmup_s)  # warm-up at the level's own concurrency, not reported
        rows.append(await drive(send, images, c, duration))
    await client.close()
    return rows


# ---------------------------------------------------------------- the client process, Triton's statistics

def write_queries(images: list[bytes], path: Path) -> Path:
    """The query JPEGs in one file for the client processes (our own pickle, read back by us)."""
    import pickle

    path.write_bytes(pickle.dumps(images))
    return path


def run_client(url: str, queries: Path, concurrency: int, duration: float, warmup_s: float = 1.0) -> dict[str, Any]:
    """One load level from a client in its own process (``--client``): the row ``drive`` returns."""
    cmd = [sys.executable, __file__, "--client", url, "--queries-file", str(queries), "--levels", str(concurrency),
           "--duration", str(duration), "--warmup", str(warmup_s)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup_s + 300)
    if done.returncode != 0:
        raise RuntimeError(f"load client failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1])[0])


def client_main(url: str, queries: Path, levels: list[int], duration: float, warmup_s: float) -> int:
    import pickle

    images = pickle.loads(queries.read_bytes())
    print(json.dumps(asyncio.run(load_triton(url, images, levels, duration, warmup_s))))
    return 0


def encoder_stats(service: Any) -> dict[str, Any]:
    """Triton's statistics of the encoder model, from its private HTTP port with the admin key
    (the public front door refuses the statistics API)."""
    import urllib.request

    from ascl import names
    from ascl.serving.online.server import ADMIN_KEY_HEADER

    url = f"http://127.0.0.1:{service.triton.ports['http']}/v2/models/{names.MODEL_ENCODER}/stats"
    request = urllib.request.Request(url, headers={ADMIN_KEY_HEADER: service.admin_key})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return dict(json.loads(resp.read())["model_stats"][0])


def batch_histogram(before: dict[str, Any], after: dict[str, Any]) -> dict[int, int]:
    """Executions per batch size between two snapshots of a model's statistics (``batch_stats``)."""
    def counts(stats: dict[str, Any]) -> dict[int, int]:
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}

    old, new = counts(before), counts(after)
    return {b: n - old.get(b, 0) for b, n in sorted(new.items()) if n - old.get(b, 0) > 0}


def mean_batch(histogram: dict[int, int]) -> float:
    executions = sum(histogram.values())
    return sum(b * n for b, n in histogram.items()) / executions if executions else 0.0


def representative_batches(histogram: dict[int, int], k: int = 4) -> list[int]:
    """The ``k`` batch sizes that carried the most images (what an engine is measured at)."""
    ranked = sorted(histogram, key=lambda b: (-b * histogram[b], b))
    return sorted(ranked[:k])


def weighted_rate(histogram: dict[int, int], rates: dict[int, float]) -> float:
    """Images/s of an engine that runs exactly the server's batches: total images over the time
    the engine needs for them (each size at the rate of the nearest measured size)."""
    if not histogram or not rates:
        return 0.0
    measured = sorted(rates)
    images = seconds = 0.0
    for batch, executions in histogram.items():
        nearest = min(measured, key=lambda m: (abs(m - batch), m))
        images += batch * executions
        seconds += batch * executions / rates[nearest]
    return images / seconds


def encoder_layout(repository: Path) -> tuple[int, int]:
    """(instances, ONNX Runtime intra-op threads per instance) of the served encoder model."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from ascl import names

    text = (repository / names.MODEL_ENCODER / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    instances = sum(g.count for g in config.instance_group) or 1
    threads = int(config.parameters["threads"].string_value) if "threads" in config.parameters else 0
    return instances, threads


def engine_rate(onnx_path: Path, pixels: np.ndarray, batch: int, *, sessions: int, threads: int,
                seconds: float) -> float:
    """Images/s of ``sessions`` ONNX Runtime sessions (``threads`` each, no spinning, as the served
    encoder's instances) running batches of ``batch`` side by side for ``seconds``."""
    import threading

    from ascl.export.runtime import OnnxEmbedder

    reps = -(-batch // len(pixels))
    x = np.ascontiguousarray(np.concatenate([pixels] * reps)[:batch])  # [B, S, S, 3]
    engines = [OnnxEmbedder(onnx_path, providers=["CPUExecutionProvider"], threads=threads, spinning=False)
               for _ in range(sessions)]
    for engine in engines:
        engine.embed(x)  # warm-up
    done = [0] * sessions
    start = time.perf_counter()
    deadline = start + seconds

    def run(i: int) -> None:
        while time.perf_counter() < deadline or done[i] == 0:
            engines[i].embed(x)
            done[i] += batch

    workers = [threading.Thread(target=run, args=(i,)) for i in range(sessions)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - start)


def decode_rate(images: list[bytes], size: int, seconds: float = 1.0) -> float:
    """Images/s of the serving decode rule (``ascl.images.decode_image``) on the query JPEGs, one thread."""
    from ascl.images import decode_image

    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n == 0:
        decode_image(images[n % len(images)], size)
        n += 1
    return n / (time.perf_counter() - start)


def measure_engines(systems: dict[str, tuple[Path, Path, dict[int, int], tuple[int, ...]]], images: list[bytes],
                    seconds: float, rounds: int = 3) -> dict[str, dict[str, Any]]:
    """The engine_only row of each served ONNX file (name -> (onnx, its repository, the batch sizes
    its server formed, more sizes to measure)), at the server's batch sizes (see the module doc).

    Every reading is the best of ``rounds`` bursts, the engines taking turns burst by burst, so a
    noisy neighbour slows all of them alike and the int8 / fp32 ratio stays fair."""
    from ascl.export.runtime import OnnxEmbedder
    from ascl.images import decode_image

    plans: dict[str, dict[str, Any]] = {}
    for name, (onnx_path, repository, histogram, extra) in systems.items():
        sessions, threads = encoder_layout(repository)
        probe = OnnxEmbedder(onnx_path, providers=["CPUExecutionProvider"], threads=1)
        pixels = np.stack([decode_image(data, probe.image_size) for data in images[:64]])  # [n, S, S, 3]
        sizes = sorted(set(representative_batches(histogram)) | set(extra)) or [1]
        plans[name] = {"onnx": onnx_path, "pixels": pixels, "sizes": sizes, "sessions": sessions, "threads": threads,
                       "precision": probe.precision, "size": probe.image_size, "rates": {}, "single": {}}
    for _ in range(rounds):
        for plan in plans.values():
            for batch in plan["sizes"]:
                kwargs = {"threads": plan["threads"], "seconds": seconds / rounds}
                rate = engine_rate(plan["onnx"], plan["pixels"], batch, sessions=plan["sessions"], **kwargs)
                single = engine_rate(plan["onnx"], plan["pixels"], batch, sessions=1, **kwargs)
                plan["rates"][batch] = max(rate, plan["rates"].get(batch, 0.0))
                plan["single"][batch] = max(single, plan["single"].get(batch, 0.0))
    rows = {}
    for name, plan in plans.items():
        histogram = systems[name][2]
        rates, single = plan["rates"], plan["single"]
        rows[name] = {
            "onnx": plan["onnx"].name, "precision": plan["precision"], "sessions": plan["sessions"],
            "threads_per_session": plan["threads"], "batch_histogram": {str(b): n for b, n in histogram.items()},
            "mean_batch": round(mean_batch(histogram), 2),
            "by_batch": [{"batch": b, "images_per_s": round(rates[b], 1), "images_per_s_one_session": round(single[b], 1)}
                         for b in plan["sizes"]],
            "rates": rates,
            "images_per_s": round(weighted_rate(histogram, rates) if histogram else rates[plan["sizes"][0]], 1),
            "images_per_s_one_session": round(weighted_rate(histogram, single), 1) if histogram else None,
            "decode_images_per_s_one_thread": round(decode_rate(images, plan["size"]), 1),
            "load_average": round(os.getloadavg()[0], 2),
        }
    return rows


def serve_repository(repository: Path, label: str, queries: Path, levels: list[int],
                     args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Serve ``repository`` through the service and run every level from a client process; returns
    the rows (each with the encoder's batch sizes at that level) and the top level's histogram."""
    from ascl.serving.online.service import SearchService, free_local_port

    rows, histogram = [], {}
    with SearchService(repository, grpc_port=free_local_port(), http_port=free_local_port(),
                       metrics_port=free_local_port(), log=lambda text: None) as service:
        print(f"{label}: serving at {service.grpc_url}", flush=True)
        for c in levels:
            before = encoder_stats(service)
            row = run_client(service.grpc_url, queries, c, args.duration)
            histogram = batch_histogram(before, encoder_stats(service))
            row["encoder_mean_batch"] = round(mean_batch(histogram), 2)
            row["load_average"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(f"{label:>24}", row, flush=True)
    return rows, histogram


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


def prepare_model(model: str, args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, Path, str]:
    """Export ``model``, index the gallery with it, write its repository: (onnx, index, repository, described)."""
    from ascl.export.onnx_export import export_onnx
    from ascl.serving.collections.build import build_index
    from ascl.serving.online.repository import write_repository

    encoder = load_benchmark_encoder(model)
    folder = tmp / f"{len(list(tmp.iterdir()))}"
    folder.mkdir()
    onnx_path = export_onnx(encoder, folder / "encoder.onnx")
    build_index(onnx_path, "cifar10-offline", folder / "idx", limit=args.gallery, progress=False)
    repo = write_repository(folder / "models", onnx_path, folder / "idx")
    described = f"{encoder.arch} width {encoder.width} ({encoder.embedding_dim}-d), {model}"
    return onnx_path, folder / "idx", repo, described


def prepare_int8(onnx_path: Path, index_dir: Path, tmp: Path) -> tuple[Path | None, Path | None, str]:
    """`ascl serve --precision int8` for the same fp32 file and index: (int8 onnx, repository, what
    happened); (None, None, why) when the int8 export is refused."""
    from ascl.errors import AsclError
    from ascl.serving.online.repository import write_repository
    from ascl.serving.online.serve import choose_model, served_model

    try:
        served = served_model(choose_model(str(onnx_path)), "int8", calibration="cifar10-offline", index=index_dir,
                              cache=tmp / "int8-cache")
    except AsclError as exc:
        return None, None, f"refused: {exc}"
    repo = write_repository(onnx_path.parent / "models-int8", served.onnx, index_dir)
    return served.onnx, repo, served.description


# The other side of the queue-delay A/B (microseconds): the Python models never wait for a fuller batch.
NOWAIT_DELAYS_US = {"encoder": 0, "preprocess": 0, "search": 0}


def with_queue_delays(repository: Path, delays: dict[str, int], out: Path) -> Path:
    """A copy of ``repository`` whose models wait ``delays`` microseconds to fill a batch."""
    import shutil

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    shutil.copytree(repository, out)
    for model, delay in delays.items():
        path = out / model / "config.pbtxt"
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        config.dynamic_batching.SetInParent()  # batching stays on at a delay of 0
        config.dynamic_batching.max_queue_delay_microseconds = delay
        path.write_text(text_format.MessageToString(config))
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


GOALS = {"served_over_engine": 0.9, "int8_qps_ratio": 1.7}


def summarize(triton: list[dict[str, Any]], int8: list[dict[str, Any]], compare: list[dict[str, Any]],
              baseline: list[dict[str, Any]], engines: dict[str, dict[str, Any]],
              fp32_histogram: dict[int, int], nowait: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ratios and goals of one run (pure: rows and engine rows in, numbers out)."""
    summary: dict[str, Any] = {"triton_errors": sum(int(r["errors"]) for r in triton)}
    by_c = {r["concurrency"]: r for r in triton}
    top = 32 if 32 in by_c else max(by_c)
    summary["top_concurrency"] = top
    if compare:
        summary["qps_ratio_vs_compare"] = {str(c["concurrency"]): round(by_c[c["concurrency"]]["qps"] / max(c["qps"], 1e-9), 2)
                                           for c in compare}
        summary["compare_errors"] = sum(int(r["errors"]) for r in compare)
    base_by_c = {r["concurrency"]: r for r in baseline}
    if 32 in by_c and 32 in base_by_c:
        summary["qps_ratio_at_32_vs_baseline"] = round(by_c[32]["qps"] / max(base_by_c[32]["qps"], 1e-9), 2)
    if 8 in by_c and 8 in base_by_c:
        summary["p99_ms_at_8"] = {"triton": by_c[8]["p99_ms"], "baseline": base_by_c[8]["p99_ms"]}
    if nowait:  # the queue-delay A/B: no waiting over the served configs, per level
        summary["qps_ratio_nowait_vs_served"] = {str(r["concurrency"]): ratio(r["qps"], by_c[r["concurrency"]]["qps"])
                                                 for r in nowait}
        summary["nowait_errors"] = sum(int(r["errors"]) for r in nowait)
    served = {"fp32": by_c[top]["qps"]}
    if int8:
        summary["int8_errors"] = sum(int(r["errors"]) for r in int8)
        served["int8"] = {r["concurrency"]: r for r in int8}[top]["qps"]
        summary["int8_qps_ratio_at_32" if top == 32 else f"int8_qps_ratio_at_{top}"] = ratio(served["int8"], served["fp32"])
    if compare:
        served["compare"] = {r["concurrency"]: r for r in compare}[top]["qps"]
    summary["served_over_engine"] = {name: ratio(served[name], engines[name]["images_per_s"])
                                     for name in served if name in engines}
    summary["served_over_one_session"] = {name: ratio(served[name], engines[name]["images_per_s_one_session"])
                                          for name in served if name in engines}
    if "fp32" in engines and "int8" in engines:  # the int8 engine at fp32's batch sizes: what int8 serving could gain
        summary["int8_engine_ratio"] = ratio(weighted_rate(fp32_histogram, engines["int8"]["rates"]),
                                             weighted_rate(fp32_histogram, engines["fp32"]["rates"]))
    errors = sum(summary.get(f"{name}_errors", 0) for name in ("triton", "int8", "compare", "nowait"))
    fp32_share = summary["served_over_engine"].get("fp32")
    int8_ratio = ratio(served.get("int8"), served["fp32"])
    summary["goals"] = {
        "zero_errors": {"value": errors, "met": errors == 0},
        "fp32_served_over_engine": {"goal": GOALS["served_over_engine"], "value": fp32_share,
                                    "met": fp32_share is not None and fp32_share >= GOALS["served_over_engine"]},
        "int8_qps_ratio": {"goal": GOALS["int8_qps_ratio"], "value": int8_ratio,
                           "ceiling_engine_ratio": summary.get("int8_engine_ratio"),
                           "met": int8_ratio is not None and int8_ratio >= GOALS["int8_qps_ratio"]},
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="encoder spec (default: the shipped default)")
    parser.add_argument("--compare", default=RANDOM_W64,
                        help=f"a second encoder served in the same run, or '' for none (default: {RANDOM_W64})")
    parser.add_argument("--no-int8", action="store_true", help="skip the --precision int8 service of --model")
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive PyTorch server")
    parser.add_argument("--no-ab", action="store_true",
                        help="skip the A/B row: the same fp32 service with the Python models' queue delays "
                             f"at {NOWAIT_DELAYS_US} (microseconds)")
    parser.add_argument("--gallery", type=int, default=5000, help="CIFAR-10 images in the served index")
    parser.add_argument("--queries", type=int, default=256, help="distinct query images (cycled)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels")
    parser.add_argument("--engine-seconds", type=float, default=1.5,
                        help="seconds per batch size of each engine_only reading (split over 3 interleaved bursts)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"), help="results JSON")
    parser.add_argument("--baseline-server", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--index", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)  # a load client process: gRPC URL
    parser.add_argument("--queries-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.levels.split(",")]
    if args.baseline_server is not None:
        serve_baseline(args.baseline_server, args.index, args.model)
        return 0
    if args.client is not None:
        return client_main(args.client, Path(args.queries_file), levels, args.duration, args.warmup)

    from ascl.serving.online.service import free_local_port

    images = query_images(args.queries)
    load_before = os.getloadavg()
    int8: list[dict[str, Any]] = []
    nowait: list[dict[str, Any]] = []
    compare: list[dict[str, Any]] = []
    baseline: list[dict[str, Any]] = []
    engines: dict[str, dict[str, Any]] = {}
    int8_note = compare_described = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        queries = write_queries(images, tmp / "queries.pkl")
        onnx_path, index_dir, repo, described = prepare_model(args.model, args, tmp)
        triton, histogram = serve_repository(repo, args.model, queries, levels, args)
        if not args.no_ab:  # A/B in the same run: the same service with the Python models not waiting
            nowait, _ = serve_repository(with_queue_delays(repo, NOWAIT_DELAYS_US, repo.parent / "models-nowait"),
                                         f"{args.model} nowait", queries, levels, args)
        int8_onnx = int8_repo = None
        int8_histogram: dict[int, int] = {}
        if not args.no_int8:
            int8_onnx, int8_repo, int8_note = prepare_int8(onnx_path, index_dir, tmp)
            print(f"int8: {int8_note}", flush=True)
            if int8_repo is not None:
                int8, int8_histogram = serve_repository(int8_repo, f"{args.model} int8", queries, levels, args)
        if args.compare:
            compare_onnx, _, compare_repo, compare_described = prepare_model(args.compare, args, tmp)
            compare, compare_histogram = serve_repository(compare_repo, args.compare, queries, levels, args)
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
        # every service is stopped: the engines have the machine to themselves
        systems = {"fp32": (onnx_path, repo, histogram, tuple(representative_batches(int8_histogram, 2)))}
        if int8_onnx is not None and int8_repo is not None:
            systems["int8"] = (int8_onnx, int8_repo, int8_histogram, tuple(representative_batches(histogram)))
        if compare:
            systems["compare"] = (compare_onnx, compare_repo, compare_histogram, ())
        engines = measure_engines(systems, images, args.engine_seconds)
        for name, row in engines.items():
            print(f"engine_only {name}", {k: v for k, v in row.items() if k not in ("rates", "batch_histogram")},
                  flush=True)

    summary = summarize(triton, int8, compare, baseline, engines, histogram, nowait)
    for row in engines.values():
        row.pop("rates")
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
                  "model": described, "compare": compare_described, "int8": int8_note,
                  "nowait": f"queue delays {NOWAIT_DELAYS_US} us" if nowait else None, "k": 10,
                  "images_per_request": 1, "client": "one process per level (tritonclient.grpc.aio)",
                  "served_through": "SearchService (front door + supervised embedded tritonserver), gRPC"},
        "triton": triton, "int8": int8, "engine_only": engines, "nowait": nowait, "compare": compare,
        "baseline": baseline,
        "summary": summary,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary), f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
