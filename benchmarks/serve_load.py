"""Load test: `image_search` through `ascl serve`'s service, for the default model (fp32 and int8) and a
comparison model, beside the encoder's own engine rate, a lean single-process server, a naive
PyTorch server and the in-process floor.

Every system serves the same FAISS gallery (each with its own model's embeddings), one image per
request, k=10, driven by the same async client loop for a fixed time at concurrency 1, 8 and 32,
one system at a time. The client runs in its own process (one per level), as a real client
would: in the benchmark's process it would share a GIL with the service's front door.

  * triton:   the service `ascl serve` runs (front door on the public ports, the embedded
              `tritonserver` behind it, `image_search` one fused Python model: decode + ONNX
              Runtime + index search per dynamic batch, no queue delay) with ``--model`` (default:
              the shipped default), requests through gRPC (`tritonclient.grpc.aio`), real photos or
              thumbnails (``--images``) as encoded JPEG bytes;
  * int8:     the same service with `ascl serve --precision int8`: the calibrated int8 export of
              the same model (calibrated on the gallery's source, verified against fp32 and refused
              below recall@10 0.95), serving the same fp32-built index (`summary.int8_qps_ratio_at_32`);
  * engine_only: ONNX Runtime alone on each served ONNX file, with the server's layout (the
              instances of `image_search` as concurrent sessions, its intra-op threads each, no
              spinning), at the batch sizes the server formed at concurrency 32 (read from Triton's
              statistics for `image_search`: `/v2/models/image_search/stats` on the private port
              with the admin key), weighted like the server's batches; JPEG decode measured
              separately (one thread); `served_over_engine` = served q/s at 32 / that rate;
  * delayed:  an A/B of the dynamic-batching queue delay in the same run: the same fp32 service
              with every model's batcher holding requests ``--ab-delay-us`` (default 500) to fill
              batches (`summary.qps_ratio_delayed_vs_served`, per level): the measurement behind
              the default of 0 (`repository.Batching`);
  * compare:  the same service with ``--compare`` (default: a seeded random ResNet-18 at width 64,
              the network the default replaced), so the serving rate of the two networks is
              measured side by side in one run (`summary.qps_ratio_vs_compare`);
  * lean:     the best single-process server a user could write in an afternoon
              (``benchmarks/lean_server.py``: asyncio gRPC speaking the same KServe v2 protocol, so
              the same client drives it; ONNX Runtime on the same file; the same index through the
              index interface; greedy micro-batching on one worker per core), in its own process
              (`summary.qps_ratio_vs_lean`, per level);
  * baseline: a stdlib ThreadingHTTPServer in its own process, decode + PyTorch eager forward
              per request (no batching) + the same FAISS search, requests through aiohttp
              (`summary.qps_ratio_vs_baseline`, per level);
  * floor:    a one-image search done in the benchmark's process, nothing else running: decode
              (`ascl.images.decode_image`) + ONNX Runtime on one thread + the index's search over
              the same vectors, median of ``--latency-requests`` (300); beside it the median of as
              many sequential one-image searches through the service and through the lean server
              (`summary.latency_at_1`).

The record holds the CPU's name and SIMD flags (`ascl.machine.cpu_simd_flags`: without VNNI/AMX
int8 convolutions reach only ~2x fp32) and the load average before, after and at every level
(a shared machine: quote figures from a quiet one).

    python benchmarks/serve_load.py                         # the full run: 20 s per level, 5,000 images (~15 min)
    python benchmarks/serve_load.py --duration 10 --gallery 2000    # the README's figures (~9 min, quiet machine)
    python benchmarks/serve_load.py --duration 5 --gallery 500 --compare '' --no-baseline   # quick (~5 min)

Goals (2-core CPU, `summary.goals`): a one-image search at concurrency 1 at most 2x the
in-process floor; never slower than the naive server at any concurrency; served / engine at
concurrency 32 at least 0.6 for the default model and 0.95 for the width-64 ResNet-18; served /
lean at least 1.0 at concurrency 8 and 32; int8 >= 1.7x the fp32 q/s at concurrency 32 (its
ceiling: the int8/fp32 engine ratio, `summary.int8_engine_ratio`); zero errors.
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
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import RANDOM_W64, load_benchmark_encoder  # noqa: E402


def query_images(n: int, source: str = "cifar10-offline") -> list[bytes]:
    """Real JPEGs from ``source``: the last ``n`` of its first 9,000 (not in a small gallery)."""
    from ascl.image_sources import iter_images

    items = list(iter_images(source, limit=9_000))[-n:]
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


def search_sender(client: Any) -> Callable[[bytes], Awaitable[None]]:
    """A one-image, k=10 `image_search` through a ``tritonclient.grpc.aio`` client."""
    from tritonclient.grpc import InferInput

    from ascl import names

    async def send(data: bytes) -> None:
        inp = InferInput(names.IMAGE_BYTES, [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        k = InferInput(names.TOP_K, [1, 1], "INT32")
        k.set_data_from_numpy(np.array([[10]], dtype=np.int32))
        result = await client.infer(names.MODEL_IMAGE_SEARCH, [inp, k])
        assert result.as_numpy(names.IDS).shape == (1, 10)

    return send


async def load_triton(url: str, images: list[bytes], levels: list[int], duration: float,
                      warmup_s: float = 2.0) -> list[dict[str, Any]]:
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(url)
    send = search_sender(client)
    rows = []
    for c in levels:
        warm = await drive(send, images, c, warmup_s)  # warm-up at the level's own concurrency, not reported
        cpu = time.process_time()
        row = await drive(send, images, c, duration)
        row["warmup_requests"] = warm["requests"] + warm["errors"]
        row["client_cpu_ms_per_request"] = round((time.process_time() - cpu) * 1000 / max(1, row["requests"]), 3)
        rows.append(row)
    await client.close()
    return rows


def latency_row(seconds: list[float], errors: int = 0) -> dict[str, Any]:
    """Median (and spread) of one-request latencies, in ms."""
    ms = np.array(seconds) * 1000 if seconds else np.array([np.nan])
    return {"requests": len(seconds), "errors": errors, "median_ms": round(float(np.median(ms)), 3),
            "p10_ms": round(float(np.percentile(ms, 10)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3)}


async def sequential_triton(url: str, images: list[bytes], requests: int, warmup: int = 30) -> dict[str, Any]:
    """``requests`` one-image searches one after another (concurrency 1): their median latency."""
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(url)
    send = search_sender(client)
    seconds: list[float] = []
    errors = 0
    for i in range(warmup + requests):
        t = time.perf_counter()
        try:
            await send(images[i % len(images)])
        except Exception:  # counted, never hidden
            errors += 1
            continue
        if i >= warmup:
            seconds.append(time.perf_counter() - t)
    await client.close()
    return latency_row(seconds, errors)


# ---------------------------------------------------------------- the client process, Triton's statistics

def write_queries(images: list[bytes], path: Path) -> Path:
    """The query JPEGs in one file for the client processes (our own pickle, read back by us)."""
    import pickle

    path.write_bytes(pickle.dumps(images))
    return path


def run_client(url: str, queries: Path, concurrency: int, duration: float, warmup_s: float = 1.0,
               requests: int = 0) -> dict[str, Any]:
    """One load level from a client in its own process (``--client``): the row ``drive`` returns;
    with ``requests``, that many sequential requests instead (the row ``sequential_triton`` returns)."""
    cmd = [sys.executable, __file__, "--client", url, "--queries-file", str(queries), "--levels", str(concurrency),
           "--duration", str(duration), "--warmup", str(warmup_s), "--client-requests", str(requests)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup_s + 300 + requests)
    if done.returncode != 0:
        raise RuntimeError(f"load client failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1])[0])


def client_main(url: str, queries: Path, levels: list[int], duration: float, warmup_s: float, requests: int) -> int:
    import pickle

    images = pickle.loads(queries.read_bytes())
    if requests:
        print(json.dumps([asyncio.run(sequential_triton(url, images, requests))]))
    else:
        print(json.dumps(asyncio.run(load_triton(url, images, levels, duration, warmup_s))))
    return 0


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def service_cpu_s(service: Any) -> dict[str, float]:
    """CPU seconds so far of each part of the service: this process (the front door's loop and
    the supervisor; the benchmark itself only waits), tritonserver, and the stubs of each model."""
    cpu = {"front_door": process_cpu_s(os.getpid()), "tritonserver": process_cpu_s(service.triton.process.pid)}
    for pid in service.triton.stub_pids():
        try:
            model = Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].decode()).parents[1].name
        except (OSError, IndexError):
            continue
        cpu[model] = cpu.get(model, 0.0) + process_cpu_s(pid)
    return cpu


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Where the CPU went per request between two ``service_cpu_s`` readings (parts that used some)."""
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    return {name: round(seconds * 1000 / max(1, requests), 3) for name, seconds in spent.items() if seconds > 0}


def model_stats(service: Any, model: str) -> dict[str, Any]:
    """Triton's statistics of ``model``, from its private HTTP port with the admin key (the public
    front door refuses the statistics API)."""
    import urllib.request

    from ascl.serving.online.server import ADMIN_KEY_HEADER

    url = f"http://127.0.0.1:{service.triton.ports['http']}/v2/models/{model}/stats"
    request = urllib.request.Request(url, headers={ADMIN_KEY_HEADER: service.admin_key})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return dict(json.loads(resp.read())["model_stats"][0])


def success_count(stats: dict[str, Any]) -> int:
    """Requests a model answered successfully so far (from its statistics)."""
    return int(stats.get("inference_stats", {}).get("success", {}).get("count", 0))


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


def served_layout(repository: Path) -> tuple[int, int]:
    """(instances, ONNX Runtime intra-op threads per instance) of the model that embeds the served
    searches (`image_search`, fused in the embedded repository)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from ascl import names

    text = (repository / names.MODEL_IMAGE_SEARCH / "config.pbtxt").read_text()
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
        sessions, threads = served_layout(repository)
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


@dataclass
class Run:
    """One system's run: a row per level, the batch sizes it formed at the top level, and the
    median of sequential one-image searches (when asked for)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    histogram: dict[int, int] = field(default_factory=dict)
    latency: dict[str, Any] | None = None


def serve_repository(repository: Path, label: str, queries: Path, levels: list[int], args: argparse.Namespace,
                     latency_requests: int = 0) -> Run:
    """Serve ``repository`` through the service and run every level from a client process (each
    row with the mean batch `image_search` formed at that level); then, with ``latency_requests``,
    that many sequential one-image searches."""
    from ascl import names
    from ascl.serving.online.service import SearchService, free_local_port

    run = Run()
    with SearchService(repository, grpc_port=free_local_port(), http_port=free_local_port(),
                       metrics_port=free_local_port(), log=lambda text: None) as service:
        print(f"{label}: serving at {service.grpc_url}", flush=True)
        for c in levels:
            before, cpu = model_stats(service, names.MODEL_IMAGE_SEARCH), service_cpu_s(service)
            row = run_client(service.grpc_url, queries, c, args.duration)
            after = model_stats(service, names.MODEL_IMAGE_SEARCH)
            run.histogram = batch_histogram(before, after)
            row["mean_batch"] = round(mean_batch(run.histogram), 2)
            served = success_count(after) - success_count(before)  # the level's and its warm-up's requests
            row["cpu_ms_per_request"] = {**cpu_ms_per_request(cpu, service_cpu_s(service), served),
                                         "client": row.pop("client_cpu_ms_per_request")}
            row["load_average"] = round(os.getloadavg()[0], 2)
            run.rows.append(row)
            print(f"{label:>24}", row, flush=True)
        if latency_requests:
            run.latency = run_client(service.grpc_url, queries, 1, 0, requests=latency_requests)
            print(f"{label:>24} sequential one-image searches:", run.latency, flush=True)
    return run


def serve_lean(onnx_path: Path, index_dir: Path, queries: Path, levels: list[int], args: argparse.Namespace,
               latency_requests: int = 0) -> Run:
    """The lean single-process server (``lean_server.py``) in its own process, driven like the service."""
    import tritonclient.grpc as grpcclient

    from ascl.serving.online.service import free_local_port

    port = free_local_port()
    url = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("lean_server.py")), "--port", str(port),
                             "--onnx", str(onnx_path), "--index", str(index_dir)])
    run = Run()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with grpcclient.InferenceServerClient(url) as client:
                    if client.is_server_ready():
                        break
            except Exception:  # not listening yet
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the lean server did not come up (exit {proc.poll()})")
            time.sleep(0.5)
        for c in levels:
            cpu = process_cpu_s(proc.pid)
            row = run_client(url, queries, c, args.duration)
            requests = row["requests"] + row["errors"] + row["warmup_requests"]
            row["cpu_ms_per_request"] = {"lean_server": round((process_cpu_s(proc.pid) - cpu) * 1000 / max(1, requests), 3),
                                         "client": row.pop("client_cpu_ms_per_request")}
            row["load_average"] = round(os.getloadavg()[0], 2)
            run.rows.append(row)
            print(f"{'lean':>24}", row, flush=True)
        if latency_requests:
            run.latency = run_client(url, queries, 1, 0, requests=latency_requests)
            print(f"{'lean':>24} sequential one-image searches:", run.latency, flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return run


def in_process_floor(onnx_path: Path, index_dir: Path, images: list[bytes], requests: int,
                     warmup: int = 30) -> dict[str, Any]:
    """The work of a one-image search done in this process, nothing in between: decode
    (``ascl.images.decode_image``), ONNX Runtime on one thread, the index's search (k=10) over the
    same vectors; the median of ``requests`` (and each part's median)."""
    from ascl.export.runtime import OnnxEmbedder
    from ascl.images import decode_image
    from ascl.serving.collections.index import limit_search_threads, open_index

    limit_search_threads(1)
    embedder = OnnxEmbedder(onnx_path, providers=["CPUExecutionProvider"], threads=1)
    index = open_index(index_dir)
    index.warm()
    total: list[float] = []
    parts: dict[str, list[float]] = {"decode": [], "embed": [], "search": []}
    for i in range(warmup + requests):
        t0 = time.perf_counter()
        pixels = decode_image(images[i % len(images)], embedder.image_size)[None]  # [1, S, S, 3]
        t1 = time.perf_counter()
        embedding = embedder.embed(pixels)  # [1, D]
        t2 = time.perf_counter()
        index.search(embedding, 10)
        t3 = time.perf_counter()
        if i >= warmup:
            total.append(t3 - t0)
            for name, spent in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                parts[name].append(spent)
    row = latency_row(total)
    row["parts_median_ms"] = {name: round(float(np.median(v)) * 1000, 3) for name, v in parts.items()}
    return row


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
    from ascl.serving.online.repository import Batching, write_repository

    encoder = load_benchmark_encoder(model)
    folder = tmp / f"{len(list(tmp.iterdir()))}"
    folder.mkdir()
    onnx_path = export_onnx(encoder, folder / "encoder.onnx")
    build_index(onnx_path, args.images, folder / "idx", limit=args.gallery, progress=False)
    repo = write_repository(folder / "models", onnx_path, folder / "idx", batching=Batching(instances=args.instances))
    described = f"{encoder.arch} width {encoder.width} ({encoder.embedding_dim}-d), {model}"
    return onnx_path, folder / "idx", repo, described


def prepare_int8(onnx_path: Path, index_dir: Path, tmp: Path, instances: int = 0, calibration: str = "cifar10-offline"
                 ) -> tuple[Path | None, Path | None, str]:
    """`ascl serve --precision int8` for the same fp32 file and index: (int8 onnx, repository, what
    happened); (None, None, why) when the int8 export is refused."""
    from ascl.errors import AsclError
    from ascl.serving.online.repository import Batching, write_repository
    from ascl.serving.online.serve import choose_model, served_model

    try:
        served = served_model(choose_model(str(onnx_path)), "int8", calibration=calibration, index=index_dir,
                              cache=tmp / "int8-cache")
    except AsclError as exc:
        return None, None, f"refused: {exc}"
    repo = write_repository(onnx_path.parent / "models-int8", served.onnx, index_dir, batching=Batching(instances=instances))
    return served.onnx, repo, served.description


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


GOALS = {"latency_at_1_over_floor": 2.0, "served_over_naive": 1.0, "fp32_served_over_engine": 0.6,
         "compare_served_over_engine": 0.95, "served_over_lean": 1.0, "int8_qps_ratio": 1.7}
SERVICE_ROWS = ("triton", "int8", "compare", "delayed")  # the rows of our own service: zero errors


def per_level(rows: list[dict[str, Any]], others: list[dict[str, Any]]) -> dict[str, float | None]:
    """q/s of ``rows`` over q/s of ``others`` at each concurrency both ran."""
    by_c = {r["concurrency"]: r for r in rows}
    return {str(o["concurrency"]): ratio(by_c[o["concurrency"]]["qps"], o["qps"])
            for o in others if o["concurrency"] in by_c}


def summarize(rows: dict[str, list[dict[str, Any]]], engines: dict[str, dict[str, Any]], fp32_histogram: dict[int, int],
              latency: dict[str, dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """The ratios and goals of one run (pure: rows, engine rows and latency rows in, numbers out).

    ``rows``: system -> one row per level (``triton`` = the fp32 service, ``int8``, ``compare``,
    ``delayed``, ``lean``, ``baseline``: the naive server); ``latency``: ``floor``, ``triton``,
    ``lean`` -> a ``latency_row``.
    """
    triton = rows["triton"]
    summary: dict[str, Any] = {f"{name}_errors": sum(int(r["errors"]) for r in got) for name, got in rows.items() if got}
    by_c = {r["concurrency"]: r for r in triton}
    top = 32 if 32 in by_c else max(by_c)
    summary["top_concurrency"] = top
    if rows.get("compare"):
        summary["qps_ratio_vs_compare"] = {k: round(v, 2) if v else v for k, v in per_level(triton, rows["compare"]).items()}
    baseline = rows.get("baseline") or []
    if baseline:
        summary["qps_ratio_vs_baseline"] = per_level(triton, baseline)
        base_by_c = {r["concurrency"]: r for r in baseline}
        if 32 in by_c and 32 in base_by_c:
            summary["qps_ratio_at_32_vs_baseline"] = round(by_c[32]["qps"] / max(base_by_c[32]["qps"], 1e-9), 2)
        if 8 in by_c and 8 in base_by_c:
            summary["p99_ms_at_8"] = {"triton": by_c[8]["p99_ms"], "baseline": base_by_c[8]["p99_ms"]}
    if rows.get("lean"):
        summary["qps_ratio_vs_lean"] = per_level(triton, rows["lean"])
    if rows.get("delayed"):  # the queue-delay A/B: batchers holding requests over the served configs (no delay)
        summary["qps_ratio_delayed_vs_served"] = per_level(rows["delayed"], triton)
    served = {"fp32": by_c[top]["qps"]}
    for name in ("int8", "compare"):
        if rows.get(name):
            served[name] = {r["concurrency"]: r for r in rows[name]}[top]["qps"]
    if "int8" in served:
        summary[f"int8_qps_ratio_at_{top}"] = ratio(served["int8"], served["fp32"])
    summary["served_over_engine"] = {name: ratio(served[name], engines[name]["images_per_s"])
                                     for name in served if name in engines}
    summary["served_over_one_session"] = {name: ratio(served[name], engines[name]["images_per_s_one_session"])
                                          for name in served if name in engines}
    if "fp32" in engines and "int8" in engines:  # the int8 engine at fp32's batch sizes: what int8 serving could gain
        summary["int8_engine_ratio"] = ratio(weighted_rate(fp32_histogram, engines["int8"]["rates"]),
                                             weighted_rate(fp32_histogram, engines["fp32"]["rates"]))
    latency = latency or {}
    floor, at_1, lean_at_1 = latency.get("floor"), latency.get("triton"), latency.get("lean")
    if floor:
        summary["latency_at_1"] = {
            "floor_ms": floor["median_ms"], "floor_parts_ms": floor.get("parts_median_ms"),
            "served_ms": at_1["median_ms"] if at_1 else None, "lean_ms": lean_at_1["median_ms"] if lean_at_1 else None,
            "served_over_floor": ratio(at_1["median_ms"], floor["median_ms"]) if at_1 else None,
            "lean_over_floor": ratio(lean_at_1["median_ms"], floor["median_ms"]) if lean_at_1 else None,
        }
    summary["goals"] = goals(summary)
    return summary


def goals(summary: dict[str, Any]) -> dict[str, Any]:
    """Each goal of the module doc: its target, the value this run measured, and whether it is met
    (None where this run did not measure it)."""
    def check(goal: float, value: float | None, at_most: bool = False) -> dict[str, Any]:
        met = None if value is None else (value <= goal if at_most else value >= goal)
        return {"goal": goal, "value": value, "met": met}

    def lowest(values: dict[str, float | None]) -> float | None:
        return None if not values or None in values.values() else min(v for v in values.values() if v is not None)

    errors = sum(summary.get(f"{name}_errors", 0) for name in SERVICE_ROWS)
    versus_lean = {k: v for k, v in (summary.get("qps_ratio_vs_lean") or {}).items() if k in ("8", "32")}
    engine = summary["served_over_engine"]
    return {
        "zero_errors": {"value": errors, "met": errors == 0},
        "latency_at_1_over_floor": check(GOALS["latency_at_1_over_floor"],
                                         (summary.get("latency_at_1") or {}).get("served_over_floor"), at_most=True),
        "never_slower_than_naive": check(GOALS["served_over_naive"], lowest(summary.get("qps_ratio_vs_baseline") or {})),
        "fp32_served_over_engine": check(GOALS["fp32_served_over_engine"], engine.get("fp32")),
        "compare_served_over_engine": check(GOALS["compare_served_over_engine"], engine.get("compare")),
        "served_over_lean_at_8_and_32": {**check(GOALS["served_over_lean"], lowest(versus_lean)), "levels": versus_lean},
        "int8_qps_ratio": {**check(GOALS["int8_qps_ratio"], summary.get(f"int8_qps_ratio_at_{summary['top_concurrency']}")),
                           "ceiling_engine_ratio": summary.get("int8_engine_ratio")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="encoder spec (default: the shipped default)")
    parser.add_argument("--compare", default=RANDOM_W64,
                        help=f"a second encoder served in the same run, or '' for none (default: {RANDOM_W64})")
    parser.add_argument("--no-int8", action="store_true", help="skip the --precision int8 service of --model")
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive PyTorch server")
    parser.add_argument("--no-lean", action="store_true", help="skip the lean single-process server (lean_server.py)")
    parser.add_argument("--no-ab", action="store_true", help="skip the queue-delay A/B row (--ab-delay-us)")
    parser.add_argument("--ab-delay-us", type=int, default=500,
                        help="the A/B row's queue delay: every model's batcher holds requests this long to fill a "
                             "batch (the served default is 0)")
    parser.add_argument("--instances", type=int, default=0,
                        help="instances of the served image_search (ascl serve --instances; 0: one per core, at most 4)")
    parser.add_argument("--latency-requests", type=int, default=300,
                        help="sequential one-image searches for the concurrency-1 medians (served, lean, floor); 0: none")
    parser.add_argument("--images", default="cifar10-offline",
                        help="image source of the gallery, the queries and the int8 calibration (imagenette-offline "
                             "for the photo model)")
    parser.add_argument("--gallery", type=int, default=5000, help="images of --images in the served index")
    parser.add_argument("--queries", type=int, default=256, help="distinct query images (cycled)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels")
    parser.add_argument("--engine-seconds", type=float, default=1.5,
                        help="seconds per batch size of each engine_only reading (split over 3 interleaved bursts)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"), help="results JSON")
    parser.add_argument("--baseline-server", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--index", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)  # a load client process: gRPC URL
    parser.add_argument("--client-requests", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.levels.split(",")]
    if args.baseline_server is not None:
        serve_baseline(args.baseline_server, args.index, args.model)
        return 0
    if args.client is not None:
        return client_main(args.client, Path(args.queries_file), levels, args.duration, args.warmup,
                           args.client_requests)

    from ascl.serving.online.repository import Batching, write_repository
    from ascl.serving.online.service import free_local_port

    images = query_images(args.queries, args.images)
    load_before = os.getloadavg()
    latency_requests = max(0, args.latency_requests)
    runs: dict[str, Run] = {}
    baseline: list[dict[str, Any]] = []
    engines: dict[str, dict[str, Any]] = {}
    latency: dict[str, dict[str, Any] | None] = {}
    int8_note = compare_described = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        queries = write_queries(images, tmp / "queries.pkl")
        onnx_path, index_dir, repo, described = prepare_model(args.model, args, tmp)
        runs["triton"] = serve_repository(repo, args.model, queries, levels, args, latency_requests)
        latency["triton"] = runs["triton"].latency
        if not args.no_ab:  # A/B in the same run: the same service with every batcher holding requests
            delayed = write_repository(repo.parent / "models-delayed", onnx_path, index_dir,
                                       batching=Batching(queue_delay_us=args.ab_delay_us, instances=args.instances))
            runs["delayed"] = serve_repository(delayed, f"{args.model} delayed", queries, levels, args)
        int8_onnx = int8_repo = None
        if not args.no_int8:
            int8_onnx, int8_repo, int8_note = prepare_int8(onnx_path, index_dir, tmp, args.instances, args.images)
            print(f"int8: {int8_note}", flush=True)
            if int8_repo is not None:
                runs["int8"] = serve_repository(int8_repo, f"{args.model} int8", queries, levels, args)
        if args.compare:
            compare_onnx, _, compare_repo, compare_described = prepare_model(args.compare, args, tmp)
            runs["compare"] = serve_repository(compare_repo, args.compare, queries, levels, args)
        if not args.no_lean:
            runs["lean"] = serve_lean(onnx_path, index_dir, queries, levels, args, latency_requests)
            latency["lean"] = runs["lean"].latency
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
        # every server is stopped: the floor and the engines have the machine to themselves
        if latency_requests:
            latency["floor"] = in_process_floor(onnx_path, index_dir, images, latency_requests)
            print("in-process floor (decode + ONNX Runtime 1 thread + index search):", latency["floor"], flush=True)
        histogram = runs["triton"].histogram
        int8_histogram = runs["int8"].histogram if "int8" in runs else {}
        systems = {"fp32": (onnx_path, repo, histogram, tuple(representative_batches(int8_histogram, 2)))}
        if int8_onnx is not None and int8_repo is not None:
            systems["int8"] = (int8_onnx, int8_repo, int8_histogram, tuple(representative_batches(histogram)))
        if "compare" in runs:
            systems["compare"] = (compare_onnx, compare_repo, runs["compare"].histogram, ())
        engines = measure_engines(systems, images, args.engine_seconds)
        for name, row in engines.items():
            print(f"engine_only {name}", {k: v for k, v in row.items() if k not in ("rates", "batch_histogram")},
                  flush=True)

    rows = {name: run.rows for name, run in runs.items()}
    rows["baseline"] = baseline
    summary = summarize(rows, engines, histogram, latency)
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
                  "delayed": f"every model's queue delay {args.ab_delay_us} us (served: 0)" if "delayed" in runs else None,
                  "lean": "benchmarks/lean_server.py: one process, asyncio gRPC (KServe v2), ONNX Runtime 1 thread x "
                          f"{os.cpu_count()} workers, greedy micro-batching" if "lean" in runs else None,
                  "latency_requests": latency_requests, "k": 10, "images_per_request": 1,
                  "client": "one process per level (tritonclient.grpc.aio)",
                  "served_through": "SearchService (front door + supervised embedded tritonserver, image_search "
                                    "fused), gRPC"},
        **{name: rows.get(name, []) for name in ("triton", "int8", "delayed", "compare", "lean", "baseline")},
        "engine_only": engines, "latency_at_1": latency,
        "summary": summary,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary), f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
