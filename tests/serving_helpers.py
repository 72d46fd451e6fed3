"""Helpers shared by the index, Triton-repository and serving tests: small real models and servers."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][:1]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def png_bytes(seed: int, size: int = 40) -> bytes:
    """A PNG of seeded random pixels: an upload that decodes, different for every seed."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


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
