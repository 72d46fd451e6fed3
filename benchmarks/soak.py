"""Soak test: good traffic against ``ascl serve`` beside bad requests and hostile clients, memory watched.

Starts ``ascl serve`` as its own process (front door, supervised Triton) on a gallery index and the
demo page (``ascl demo --server``) on top of it, then runs phases, each with ``--concurrency`` gRPC
clients sending good image searches (k=10) the whole time:

  * ``mixed`` (``--duration`` s): ``--bad-share`` of the requests are bad on purpose (corrupt
    bytes, an empty image, a request with no image, k=0, a 1 x 1,000,000 PNG, a request over the
    size limit); every good one must succeed, every bad one come back as a client error;
  * ``quiet`` (``--phase`` s): good traffic only: the p99 latency and memory the attacks are held to;
  * ``idle_flood``: ``--flood`` idle TCP connections held open on the gRPC and HTTP ports, opened
    again as the server closes them;
  * ``compression_bombs``: ``--bombs`` clients sending gzip and deflate bodies of ~1 MiB that
    inflate to ``--bomb-mb`` MiB, back to back, to the HTTP port;
  * ``data_urls``: ``--data-urls`` clients posting ``data:`` URLs of ``--data-url-mb`` MiB to the
    demo page's ``/add`` API, back to back.

Each attack phase is followed by ``--settle`` s of good traffic alone; then the memory of the
service's process tree (``ascl serve``, tritonserver, its stubs) and of the demo page is read
again. The goals, per attack: zero failed good requests, p99 of the good requests within 2x of
the quiet phase's, memory back within 10% of the quiet phase's after settling (``goals``).
Memory is sampled every second; /dev/shm too.

    python benchmarks/soak.py                                   # 2 min mixed, 30 s per phase (~6 min)
    python benchmarks/soak.py --duration 10 --phase 8 --gallery 300 --flood 300   # a quick check

Writes ``benchmarks/results/soak.json`` (machine, load average, command).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
BAD_KINDS = ("corrupt", "empty image", "no image", "k=0", "tall png", "over the size limit")
ATTACKS = ("idle_flood", "compression_bombs", "data_urls")


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


# ---------------------------------------------------------------- processes and memory


def tree_rss_mib(root: int) -> float:
    """Resident memory of ``root`` and every live process below it (MiB)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    total, frontier = 0, {root}
    while frontier:
        for pid in frontier:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], ready: str, workdir: Path, log: list[str], timeout_s: float = 600) -> subprocess.Popen[str]:
    """Start ``cmd`` and wait for a line starting with ``ready``; a thread keeps reading its output into ``log``."""
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = proc.stdout
    assert out is not None
    deadline = time.monotonic() + timeout_s
    for line in out:
        log.append(line)
        if line.startswith(ready):
            threading.Thread(target=lambda: log.extend(out), daemon=True).start()
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{cmd[3]} did not start: {''.join(log)[-3000:]}")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- traffic


class Traffic:
    """Good searches from ``concurrency`` clients the whole time; bad ones mixed in while ``bad_share`` > 0."""

    def __init__(self, grpc_url: str, good: list[bytes], concurrency: int, limit: int) -> None:
        self.url, self.good, self.limit = grpc_url, good, limit
        self.bad_share = 0.0
        self.lock = threading.Lock()
        self.good_log: list[tuple[float, float, bool]] = []  # (time, latency s, ok)
        self.good_errors: list[str] = []
        self.bad_codes: dict[str, dict[str, int]] = {kind: {} for kind in BAD_KINDS}
        self.bad = {"refused": 0, "accepted": 0}
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(concurrency)]
        for t in self.threads:
            t.start()

    def _worker(self, seed: int) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        from ascl import names

        rng = random.Random(seed)
        with grpcclient.InferenceServerClient(self.url) as client:
            while not self.stopping.is_set():
                if rng.random() < self.bad_share:
                    kind = rng.choice(BAD_KINDS)
                    images, k = bad_request(kind, rng.choice(self.good), self.limit)
                    try:
                        client.infer(names.MODEL_IMAGE_SEARCH, search_inputs(images, k), client_timeout=60)
                        outcome, key = "accepted", "accepted"
                    except InferenceServerException as exc:
                        outcome, key = "refused", str(exc.status())
                    with self.lock:
                        self.bad[outcome] += 1
                        self.bad_codes[kind][key] = self.bad_codes[kind].get(key, 0) + 1
                    continue
                began = time.monotonic()
                try:
                    result = client.infer(names.MODEL_IMAGE_SEARCH, search_inputs([rng.choice(self.good)], 10),
                                          client_timeout=60)
                    ok = result.as_numpy(names.IDS).shape == (1, 10)
                except InferenceServerException as exc:
                    ok = False
                    with self.lock:
                        self.good_errors.append(str(exc)[:200])
                with self.lock:
                    self.good_log.append((began, time.monotonic() - began, ok))

    def good_between(self, t0: float, t1: float) -> dict[str, Any]:
        with self.lock:
            rows = [(lat, ok) for at, lat, ok in self.good_log if t0 <= at < t1]
        ms = np.array([lat for lat, _ in rows]) * 1000 if rows else np.array([np.nan])
        return {"good": len(rows), "good_failed": sum(1 for _, ok in rows if not ok),
                "good_p50_ms": round(float(np.percentile(ms, 50)), 1),
                "good_p99_ms": round(float(np.percentile(ms, 99)), 1)}

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(90)


class Attack:
    """``workers`` threads running ``step()`` back to back until stopped; counts how each ended."""

    def __init__(self, step: Callable[[], str], workers: int, cleanup: Callable[[], None] | None = None) -> None:
        self.step, self.cleanup = step, cleanup
        self.outcomes: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                outcome = self.step()
            except OSError as exc:  # refused, reset or closed while sending: the server said no
                outcome = type(exc).__name__
            with self.lock:
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def stop(self) -> dict[str, int]:
        self.stopping.set()
        for t in self.threads:
            t.join(120)
        if self.cleanup is not None:
            self.cleanup()
        return dict(self.outcomes)


def idle_flood(ports: list[int], count: int) -> Attack:
    """Keep ``count`` idle connections open across ``ports``, reopening those the server closed."""
    held: list[socket.socket] = []

    def step() -> str:
        for s in list(held):  # drop what the server closed (cap, header timeout)
            s.setblocking(False)
            try:
                if s.recv(65536) == b"":
                    held.remove(s)
                    s.close()
            except BlockingIOError:
                pass
            except OSError:
                held.remove(s)
                s.close()
        while len(held) < count:
            try:
                held.append(socket.create_connection(("127.0.0.1", ports[len(held) % len(ports)]), timeout=2))
            except OSError:
                break
        time.sleep(1.0)
        return f"held {len(held) // 100 * 100}+"

    def close_all() -> None:
        for s in held:
            s.close()

    return Attack(step, 1, close_all)


def bomb(encoding: str, inflated_mib: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    zeros = b"\0" * 2**20
    return b"".join([packer.compress(zeros) for _ in range(inflated_mib)] + [packer.flush()])


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> str:
    """One POST on a fresh connection: its status, or how the connection ended."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return str(resp.status)
    finally:
        conn.close()


def compression_bombs(http_port: int, workers: int, inflated_mib: int) -> Attack:
    bodies = {enc: bomb(enc, inflated_mib) for enc in ("gzip", "deflate")}
    turn = [0]

    def step() -> str:
        turn[0] += 1
        encoding = ("gzip", "deflate")[turn[0] % 2]
        return post(http_port, "/v2/models/embed/infer", bodies[encoding],
                    {"Content-Type": "application/json", "Content-Encoding": encoding})

    return Attack(step, workers)


def data_urls(demo_port: int, workers: int, mib: float) -> Attack:
    url = "data:image/png;base64," + base64.b64encode(os.urandom(int(mib * 2**20))).decode()
    body = json.dumps({"data": [{"url": url, "meta": {"_type": "gradio.FileData"}}, "soak"]}).encode()

    def step() -> str:
        return post(demo_port, "/gradio_api/call/add", body, {"Content-Type": "application/json"})

    return Attack(step, workers)


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ascl.image_sources import iter_images
    from ascl.serving.collections.build import build_index
    from ascl.serving.collections.model_files import resolve_onnx

    limit = int(args.max_request_mb * 2**20)
    good = [item.read() for item in list(iter_images(args.images, limit=args.gallery + 64))[-64:]]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        onnx = resolve_onnx(args.model)
        build_index(onnx, args.images, tmp / "idx", limit=args.gallery, progress=False)
        ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port(), "demo": free_port()}
        serve_log: list[str] = []
        serve = start([sys.executable, "-m", "ascl", "serve", "--model", str(onnx), "--index", str(tmp / "idx"),
                       "--repository", str(tmp / "models"), "--max-request-mb", str(args.max_request_mb),
                       "--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]),
                       "--metrics-port", str(ports["metrics"])], "ready:", tmp, serve_log)
        demo_log: list[str] = []
        demo = None
        try:
            if not args.no_hostile:
                demo = start([sys.executable, "-m", "ascl", "demo", "--server", f"127.0.0.1:{ports['grpc']}",
                              "--index", str(tmp / "idx"), "--port", str(ports["demo"]), "--cache", str(tmp / "cache")],
                             "demo:", tmp, demo_log)
            record = phases(args, serve, demo, ports, good, limit)
        finally:
            for proc in (demo, serve):
                if proc is not None:
                    stop(proc)
        record["restarts"] = sum("restarting tritonserver" in line for line in serve_log)
    record.update({
        "benchmark": "soak", "machine": {"cpu": machine.cpu_name(), "cpu_simd": machine.cpu_simd_flags(),
                                         "cores": os.cpu_count()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "setup": {"model": args.model, "images": args.images, "gallery": args.gallery, "concurrency": args.concurrency,
                  "duration_s": args.duration, "bad_share": args.bad_share, "max_request_mb": args.max_request_mb,
                  "phase_s": args.phase, "settle_s": args.settle, "flood": args.flood, "bombs": args.bombs,
                  "bomb_mb": args.bomb_mb, "data_urls": args.data_urls, "data_url_mb": args.data_url_mb},
    })
    return record


def phases(args: argparse.Namespace, serve: subprocess.Popen[str], demo: subprocess.Popen[str] | None,
           ports: dict[str, int], good: list[bytes], limit: int) -> dict[str, Any]:
    memory: list[tuple[float, float]] = []
    shm: list[tuple[float, float]] = []
    demo_memory: list[tuple[float, float]] = []
    sampling = threading.Event()
    began = time.monotonic()

    def sample() -> None:
        while not sampling.is_set():
            now = time.monotonic() - began
            memory.append((now, tree_rss_mib(serve.pid)))
            shm.append((now, shm_mib()))
            if demo is not None:
                demo_memory.append((now, tree_rss_mib(demo.pid)))
            sampling.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    traffic = Traffic(f"127.0.0.1:{ports['grpc']}", good, args.concurrency, limit)
    try:
        traffic.bad_share = args.bad_share
        t0 = time.monotonic()
        time.sleep(args.duration)
        traffic.bad_share = 0.0
        mixed = {**traffic.good_between(t0, time.monotonic()), "bad": dict(traffic.bad)}
        rows: dict[str, Any] = {}
        if not args.no_hostile:
            t0 = time.monotonic()
            time.sleep(args.phase)
            quiet = traffic.good_between(t0, time.monotonic())
            quiet.update(service_mib=round(tree_rss_mib(serve.pid), 1),
                         demo_mib=round(tree_rss_mib(demo.pid), 1) if demo is not None else None)
            rows["quiet"] = quiet
            for name in ATTACKS:
                rows[name] = attack_phase(name, args, traffic, serve, demo, ports, quiet)
    finally:
        traffic.stop()
        sampling.set()
        sampler.join(10)
    record: dict[str, Any] = {
        "requests": len(traffic.good_log) + sum(traffic.bad.values()),
        "counts": {"good_ok": sum(1 for *_, ok in traffic.good_log if ok),
                   "good_failed": sum(1 for *_, ok in traffic.good_log if not ok),
                   "bad_refused": traffic.bad["refused"], "bad_accepted": traffic.bad["accepted"]},
        "mixed": mixed, "good_errors": traffic.good_errors[:10], "bad_codes": traffic.bad_codes,
        "memory_mib": summary(memory), "shm_mib": summary(shm),
    }
    if demo_memory:
        record["demo_memory_mib"] = summary(demo_memory)
    if rows:
        record["hostile"] = rows
        record["goals"] = {name: rows[name]["goals"] for name in ATTACKS}
    return record


def attack_phase(name: str, args: argparse.Namespace, traffic: Traffic, serve: subprocess.Popen[str],
                 demo: subprocess.Popen[str] | None, ports: dict[str, int], quiet: dict[str, Any]) -> dict[str, Any]:
    """One attack beside the good traffic for ``--phase`` s, then ``--settle`` s of good traffic alone."""
    if name == "idle_flood":
        attack = idle_flood([ports["grpc"], ports["http"]], args.flood)
    elif name == "compression_bombs":
        attack = compression_bombs(ports["http"], args.bombs, args.bomb_mb)
    else:
        assert demo is not None
        attack = data_urls(ports["demo"], args.data_urls, args.data_url_mb)
    peak_service, peak_demo = 0.0, 0.0
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.phase:
        peak_service = max(peak_service, tree_rss_mib(serve.pid))
        peak_demo = max(peak_demo, tree_rss_mib(demo.pid)) if demo is not None else 0.0
        time.sleep(0.5)
    outcomes = attack.stop()
    row = traffic.good_between(t0, time.monotonic())
    time.sleep(args.settle)
    after_service = tree_rss_mib(serve.pid)
    after_demo = tree_rss_mib(demo.pid) if demo is not None else 0.0
    row.update(attack_outcomes=outcomes, service_peak_mib=round(peak_service, 1),
               service_after_mib=round(after_service, 1), demo_peak_mib=round(peak_demo, 1),
               demo_after_mib=round(after_demo, 1))
    row["goals"] = {
        "zero_failed_good": row["good_failed"] == 0,
        "p99_within_2x_quiet": bool(row["good_p99_ms"] <= 2 * quiet["good_p99_ms"]),
        "memory_back_within_10pct": bool(after_service <= 1.10 * quiet["service_mib"]
                                          and (demo is None or after_demo <= 1.10 * quiet["demo_mib"])),
    }
    return row


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    if not samples:
        return {"first": 0.0, "last": 0.0, "peak": 0.0, "trend_second_half_mib_per_min": 0.0}
    return {"first": round(samples[0][1], 1), "last": round(samples[-1][1], 1),
            "peak": round(max(v for _, v in samples), 1),
            "trend_second_half_mib_per_min": round(trend_mib_per_min(samples), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="any model 'ascl serve --model' accepts (default: default)")
    p.add_argument("--images", default="cifar10-offline", help="gallery and query source (default: cifar10-offline)")
    p.add_argument("--gallery", type=int, default=2000, help="images in the served index")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of the mixed phase (good and bad requests)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent gRPC clients of good traffic")
    p.add_argument("--bad-share", type=float, default=0.3, help="share of bad requests in the mixed phase")
    p.add_argument("--max-request-mb", type=float, default=8.0, help="the service's request size limit")
    p.add_argument("--phase", type=float, default=30.0, help="seconds of the quiet phase and of each attack")
    p.add_argument("--settle", type=float, default=10.0, help="seconds of good traffic alone after each attack")
    p.add_argument("--flood", type=int, default=2000, help="idle connections held open in the flood")
    p.add_argument("--bombs", type=int, default=2, help="concurrent compression-bomb senders")
    p.add_argument("--bomb-mb", type=int, default=1024, help="what one bomb inflates to (MiB; ~1/1000 is sent)")
    p.add_argument("--data-urls", type=int, default=4, help="concurrent senders of oversized data: URLs to the demo")
    p.add_argument("--data-url-mb", type=float, default=64.0, help="image bytes in one data: URL (MiB)")
    p.add_argument("--no-hostile", action="store_true", help="the mixed phase only (no demo page, no attacks)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = p.parse_args(argv)
    from ascl.atomic import atomic_write_text

    record = run(args)
    record["command"] = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(
        ["soak.py", *argv])
    atomic_write_text(Path(args.out), json.dumps(record, indent=2) + "\n")
    shown = ("requests", "counts", "restarts", "memory_mib", "shm_mib", "demo_memory_mib", "hostile", "goals")
    print(json.dumps({k: record[k] for k in shown if k in record}, indent=2))
    print(f"-> {args.out}")
    failed = record["counts"]["good_failed"] or record["counts"]["bad_accepted"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
