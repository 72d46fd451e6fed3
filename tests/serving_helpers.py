"""Helpers shared by the index, Triton-repository and serving tests: small real models and servers."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_EXPORTED: dict[tuple[int, int, int], Path] = {}


def export_random_encoder(path: Path, seed: int = 0, image_size: int = 32, width: int = 16) -> Path:
    """A seeded, randomly initialised ResNet-18 encoder (base ``width``: 16 gives 128-d embeddings at a
    sixteenth of the full width's cost; 64 is torchvision's) exported to ONNX. Exported once per test
    session and copied, since an export takes seconds on a busy 2-core machine."""
    import atexit
    import shutil
    import tempfile

    import torch

    from ascl.encoder import Encoder
    from ascl.export.onnx_export import export_onnx

    key = (seed, image_size, width)
    if key not in _EXPORTED or not _EXPORTED[key].is_file():
        torch.manual_seed(seed)
        folder = tempfile.mkdtemp(prefix="ascl-test-onnx-")
        atexit.register(shutil.rmtree, folder, True)
        cached = Path(folder) / f"random_{seed}_{image_size}_w{width}.onnx"
        _EXPORTED[key] = export_onnx(Encoder(image_size=image_size, width=width).eval(), cached)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_EXPORTED[key], path)
    return path


def process_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (R, S, T when stopped, Z a zombie...); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and process_state(int(entry.name)) not in (None, "Z"):
            found.append(int(entry.name))
    return found


def png_bytes(seed: int, size: int = 40) -> bytes:
    """A PNG of seeded random pixels: an upload that decodes, different for every seed."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def huge_png(side: int = 30_000) -> bytes:
    """A valid PNG header claiming ``side`` x ``side`` pixels, with almost no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def supervised_service(root: Path, images: Path, *, max_request_bytes: int | None = None,
                       max_queue_size: int | None = None, **service_kwargs: Any) -> Any:
    """A ``SearchService`` (not started) on free ports over a random encoder and an index of
    ``images``, logging into ``service.events_log``; repository limits as given."""
    from conftest import free_port

    from ascl.serving.collections.build import build_index
    from ascl.serving.online.repository import write_repository
    from ascl.serving.online.service import SearchService

    onnx_path = export_random_encoder(root / "encoder.onnx")
    build_index(onnx_path, str(images), root / "idx", progress=False)
    repo_limits = {k: v for k, v in (("max_request_bytes", max_request_bytes), ("max_queue_size", max_queue_size))
                   if v is not None}
    repo = write_repository(root / "models", onnx_path, root / "idx", **repo_limits)
    events: list[str] = []
    service = SearchService(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                            log=events.append, **service_kwargs)
    service.events_log = events  # type: ignore[attr-defined]
    return service


def served_until_teardown(service: Any) -> Iterator[Any]:
    """A fixture's body for a service: started, yielded, stopped in teardown, and nothing of its
    repository left running."""
    try:
        service.start()
        yield service
    finally:
        service.stop()
    assert processes_mentioning(str(service.repository)) == []


def under_load(service: Any, images: list[bytes], act: Callable[[], None], *,
               recover_within_s: float = 60) -> tuple[list[str], float]:
    """4 clients search while ``act()`` breaks the server: (the outcomes from the act on, seconds
    until searches succeeded again)."""
    import threading
    import time

    from tritonclient.utils import InferenceServerException

    from ascl.serving import Client

    outcomes: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with Client(service.grpc_url, timeout_s=120) as c:
            i = 0
            while not stop.is_set():
                try:
                    c.search([images[i % len(images)]], k=3)
                    outcomes.append("ok")
                except InferenceServerException as exc:
                    outcomes.append(f"{exc.status()}: {str(exc.message())[:160]}")
                i += 1

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: outcomes.count("ok") >= 8, 60, "searches before the act")
        mark = len(outcomes)
        acted = time.monotonic()
        act()
        while time.monotonic() - acted < recover_within_s and "ok" not in outcomes[mark + 8:]:
            time.sleep(0.2)
        recovered = time.monotonic() - acted
        time.sleep(1)
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    return outcomes[mark:], recovered


def serve_until_ready(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    """``ascl serve ARGS`` started and read up to its ``ready:`` line: (the process, its output lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "ascl", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("ready:"):
            return proc, lines
    stop(proc)
    raise AssertionError(f"ascl serve exited with {proc.returncode} before ready:\n" + "\n".join(lines[-40:]))


def stop(proc: subprocess.Popen[str], timeout_s: float = 90) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; returns the exit code."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.05) -> None:
    """Poll ``condition`` until it is true; fail saying ``what`` did not happen within ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:g} s"
        time.sleep(every_s)
