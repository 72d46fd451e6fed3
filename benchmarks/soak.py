"""Soak test: mixed good and hostile traffic against ``ascl serve``'s service, memory watched.

Starts the service the way ``ascl serve`` does (front door, supervised Triton), then for
``--duration`` seconds ``--concurrency`` gRPC workers send image searches; ``--bad-share`` of
the requests are bad on purpose (corrupt bytes, an empty image, a request with no image, k=0,
a 1 x 1,000,000 PNG, a request over the size limit). Every good request must succeed; every
bad one must come back as a client error. Every 2 s it samples the resident memory of Triton
and its stubs and the size of /dev/shm, and reports the first, last and peak values and the
trend over the second half (MiB per minute; flat is near 0).

    python benchmarks/soak.py                           # 2 minutes, concurrency 16
    python benchmarks/soak.py --duration 10 --gallery 300   # a quick check

Writes ``benchmarks/results/soak.json`` (machine, load average, command).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
BAD_KINDS = ("corrupt", "empty image", "no image", "k=0", "tall png", "over the size limit")


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def bad_request(kind: str, good: bytes, limit: int) -> tuple[list[bytes], int]:
    """(images, k) of one bad request of ``kind``."""
    if kind == "corrupt":
        return [good[: len(good) // 2]], 5
    if kind == "empty image":
        return [b""], 5
    if kind == "no image":
        return [], 5
    if kind == "k=0":
        return [good], 0
    if kind == "tall png":
        return [png((1, 1_000_000), mode="L")], 5
    return [os.urandom(limit // 4 + 1)] * 4, 5  # over the size limit


def search_inputs(images: list[bytes], k: int) -> list[Any]:
    import tritonclient.grpc as grpcclient

    from ascl import names

    image = grpcclient.InferInput(names.IMAGE_BYTES, [len(images), 1], "BYTES")
    image.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_).reshape(len(images), 1))
    top_k = grpcclient.InferInput(names.TOP_K, [max(1, len(images)), 1], "INT32")
    top_k.set_data_from_numpy(np.full((max(1, len(images)), 1), k, dtype=np.int32))
    return [image, top_k]


def process_rss_mib(needle: str) -> float:
    """Resident memory of every process whose command line contains ``needle`` (MiB)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def shm_mib() -> float:
    return sum(p.stat().st_size for p in Path("/dev/shm").iterdir() if p.is_file()) / 2**20


def trend_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope over the second half of (seconds, MiB) samples, per minute."""
    half = samples[len(samples) // 2:]
    if len(half) < 3:
        return 0.0
    t, v = np.array([s[0] for s in half]), np.array([s[1] for s in half])
    return float(np.polyfit(t, v, 1)[0] * 60)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from ascl import names
    from ascl.image_sources import iter_images
    from ascl.serving.collections.build import build_index
    from ascl.serving.collections.model_files import resolve_onnx
    from ascl.serving.online.front_door import Limits
    from ascl.serving.online.repository import write_repository
    from ascl.serving.online.service import SearchService, free_local_port

    limit = int(args.max_request_mb * 2**20)
    good = [item.read() for item in list(iter_images(args.images, limit=args.gallery + 64))[-64:]]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        onnx = resolve_onnx(args.model)
        build_index(onnx, args.images, tmp / "idx", limit=args.gallery, progress=False)
        repo = write_repository(tmp / "models", onnx, tmp / "idx", max_request_bytes=limit)
        service = SearchService(repo, grpc_port=free_local_port(), http_port=free_local_port(),
                                metrics_port=free_local_port(), limits=Limits(max_request_bytes=limit))
        counts: dict[str, int] = {"good_ok": 0, "good_failed": 0, "bad_refused": 0, "bad_accepted": 0}
        bad_codes: dict[str, dict[str, int]] = {kind: {} for kind in BAD_KINDS}
        good_errors: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            with grpcclient.InferenceServerClient(service.grpc_url) as client:
                while not stop.is_set():
                    if rng.random() < args.bad_share:
                        kind = rng.choice(BAD_KINDS)
                        images, k = bad_request(kind, rng.choice(good), limit)
                        try:
                            client.infer(names.MODEL_IMAGE_SEARCH, search_inputs(images, k), client_timeout=60)
                            outcome, key = "bad_accepted", "accepted"
                        except InferenceServerException as exc:
                            outcome, key = "bad_refused", str(exc.status())
                        with lock:
                            counts[outcome] += 1
                            bad_codes[kind][key] = bad_codes[kind].get(key, 0) + 1
                        continue
                    try:
                        result = client.infer(names.MODEL_IMAGE_SEARCH, search_inputs([rng.choice(good)], 10),
                                              client_timeout=60)
                        ok = result.as_numpy(names.IDS).shape == (1, 10)
                    except InferenceServerException as exc:
                        ok = False
                        with lock:
                            good_errors.append(str(exc)[:200])
                    with lock:
                        counts["good_ok" if ok else "good_failed"] += 1

        memory: list[tuple[float, float]] = []
        shm: list[tuple[float, float]] = []
        load_before = os.getloadavg()
        with service:
            threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
            started = time.monotonic()
            for t in threads:
                t.start()
            while time.monotonic() - started < args.duration:
                now = time.monotonic() - started
                memory.append((now, process_rss_mib(str(repo))))
                shm.append((now, shm_mib()))
                time.sleep(2.0)
            stop.set()
            for t in threads:
                t.join(90)
            elapsed = time.monotonic() - started
            restarts = service.events.restarts
    return {
        "benchmark": "soak", "machine": {"cpu": machine.cpu_name(), "cpu_simd": machine.cpu_simd_flags(),
                                         "cores": os.cpu_count()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "setup": {"model": args.model, "images": args.images, "gallery": args.gallery, "concurrency": args.concurrency,
                  "duration_s": args.duration, "bad_share": args.bad_share, "max_request_mb": args.max_request_mb},
        "requests": sum(counts.values()), "requests_per_s": round(sum(counts.values()) / elapsed, 1),
        "counts": counts, "good_errors": good_errors[:10], "bad_codes": bad_codes, "restarts": restarts,
        "memory_mib": {"first": round(memory[0][1], 1), "last": round(memory[-1][1], 1),
                       "peak": round(max(v for _, v in memory), 1),
                       "trend_second_half_mib_per_min": round(trend_mib_per_min(memory), 2)},
        "shm_mib": {"first": round(shm[0][1], 1), "last": round(shm[-1][1], 1), "peak": round(max(v for _, v in shm), 1),
                    "trend_second_half_mib_per_min": round(trend_mib_per_min(shm), 2)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="any model 'ascl serve --model' accepts (default: default)")
    p.add_argument("--images", default="cifar10-offline", help="gallery and query source (default: cifar10-offline)")
    p.add_argument("--gallery", type=int, default=2000, help="images in the served index")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent gRPC clients")
    p.add_argument("--bad-share", type=float, default=0.3, help="share of bad requests")
    p.add_argument("--max-request-mb", type=float, default=8.0, help="the service's request size limit")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = p.parse_args(argv)
    from ascl.atomic import atomic_write_text

    record = run(args)
    record["command"] = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(
        ["soak.py", *argv])
    atomic_write_text(Path(args.out), json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("requests", "requests_per_s", "counts", "restarts", "memory_mib",
                                            "shm_mib")}, indent=2))
    print(f"-> {args.out}")
    failed = record["counts"]["good_failed"] or record["counts"]["bad_accepted"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
