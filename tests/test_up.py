"""``ascl up`` end to end: a real process tree (ascl, tritonserver, its Python-backend stubs,
the Gradio page), searched through the gRPC client and through the page with gradio_client,
then stopped with SIGTERM. One ``ascl up`` is shared by the whole module to keep it fast.

Runs in a temporary working folder (no ``runs/``), so the model is the shipped default (what a
newcomer gets); the gallery is the small digits folder and the cache is temporary.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, fresh_cache
from PIL import Image
from serving_helpers import serve_until_ready, stop

READY_TIMEOUT_S = 420


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int]
    cache: Path
    seen: set[tuple[int, str]]  # (pid, start time) of every descendant seen while running

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def demo_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['port']}/"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.ports['grpc-port']}"


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, from /proc; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return (int(fields[1]), fields[19]) if fields[0] != "Z" else None


def descendants(root: int) -> set[tuple[int, str]]:
    """Every live process below ``root``, as (pid, start time) so that reused pids do not count."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = info
    found: set[tuple[int, str]] = set()
    frontier = {root}
    while frontier:
        children = {pid for pid, (ppid, _) in parents.items() if ppid in frontier}
        found |= {(pid, parents[pid][1]) for pid in children}
        frontier = children
    return found


def alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    return {(pid, start) for pid, start in processes if (info := _stat(pid)) is not None and info[1] == start}


def start_up(workdir: Path, gallery: Path, cache: Path) -> Up:
    ports = {name: free_port() for name in ("port", "grpc-port", "http-port", "metrics-port")}
    args = [sys.executable, "-m", "ascl", "up", "--gallery", str(gallery), "--cache", str(cache)]
    for name, port in ports.items():
        args += [f"--{name}", str(port)]
    log = workdir / f"up-{len(list(workdir.glob('up-*.log')))}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    with open(log, "wb") as out:
        process = subprocess.Popen(args, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env)
    up = Up(process, log, ports, cache, set())
    deadline = time.monotonic() + READY_TIMEOUT_S
    while "ready in" not in up.output():
        up.seen |= descendants(process.pid)
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"ascl up did not become ready (rc={process.poll()}):\n{up.output()[-4000:]}")
        time.sleep(0.5)
    up.seen |= descendants(process.pid)
    return up


def stop_up(up: Up) -> int:
    up.seen |= descendants(up.process.pid)
    up.process.send_signal(signal.SIGTERM)
    try:
        return up.process.wait(timeout=90)
    finally:
        if up.process.poll() is None:
            up.process.kill()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("up-workdir")


@pytest.fixture(scope="module")
def running(workdir: Path, digits_folder: Path) -> Iterator[Up]:
    """One ``ascl up`` for the module, stopped with SIGTERM in teardown, leaving nothing running."""
    up = start_up(workdir, digits_folder, fresh_cache(workdir / "cache"))
    try:
        yield up
    finally:
        assert stop_up(up) == 0, up.output()[-3000:]
    deadline = time.monotonic() + 10
    while alive(up.seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(up.seen) == set(), f"left running: {alive(up.seen)}"


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_port_in_use_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "ascl", "up", "--grpc-port", str(port), "--cache", str(tmp_path)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"port {port} (--grpc-port) is in use" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "models").exists()  # failed before any slow step


@pytest.mark.triton
def test_screen_tells_what_runs(running: Up) -> None:
    from ascl.registry import DEFAULT_MODEL

    text = running.output()
    assert f"model:   {DEFAULT_MODEL}, the pretrained default" in text
    assert "WARNING" not in text and "RANDOMLY" not in text and "NO TRAINED MODEL" not in text
    assert running.demo_url in text and running.grpc in text
    assert "index:   built" in text and "ONNX exported" in text
    assert any("tritonserver" in Path(f"/proc/{pid}/cmdline").read_text() for pid, _ in alive(running.seen))


@pytest.mark.triton
def test_search_through_grpc_client(running: Up, digits_folder: Path) -> None:
    from ascl.serving import Client

    query = sorted(digits_folder.rglob("*.png"))[17]
    (hits,) = Client(running.grpc).search([query.read_bytes()], k=5)
    assert len(hits) == 5 and hits[0].metadata["path"] == query.relative_to(digits_folder).as_posix()
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


@pytest.mark.triton
def test_demo_search_returns_k_ordered_results(running: Up, digits_folder: Path) -> None:
    from gradio_client import Client, handle_file

    query = sorted(digits_folder.rglob("*.png"))[42]
    gallery, status, raw = Client(running.demo_url, verbose=False).predict(handle_file(str(query)), 7,
                                                                           api_name="/search")
    assert len(gallery) == 7 and len(raw) == 7 and "7 results in" in status and "Triton" in status
    scores = [r["score"] for r in raw]
    assert scores == sorted(scores, reverse=True) and raw[0]["name"] == query.relative_to(digits_folder).as_posix()
    assert gallery[0]["caption"].startswith("1.000 · ")


@pytest.mark.triton
def test_demo_add_then_search_finds_it_first(running: Up, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    new = tmp_path / "new.png"
    new.write_bytes(png_bytes(11))
    client = Client(running.demo_url, verbose=False)
    status, added = client.predict(handle_file(str(new)), "my-noise", api_name="/add")
    assert "Added as id" in status
    _, _, raw = client.predict(handle_file(str(new)), 3, api_name="/search")
    assert raw[0]["id"] == added[0]["id"] and raw[0]["label"] == "my-noise"


@pytest.mark.triton
def test_demo_bad_image_keeps_working(running: Up, tmp_path: Path, digits_folder: Path) -> None:
    from gradio_client import Client, handle_file

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    client = Client(running.demo_url, verbose=False)
    gallery, status, _ = client.predict(handle_file(str(bad)), 5, api_name="/search")
    assert gallery == [] and "not an image we can read" in status
    gallery, _, _ = client.predict(handle_file(str(sorted(digits_folder.rglob("*.png"))[0])), 5, api_name="/search")
    assert len(gallery) == 5


def repository_files(root: Path) -> dict[str, bytes]:
    """Every file of a model repository by relative path (the stubs' __pycache__ left out)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.triton
def test_serve_writes_the_same_model_repository_as_up(running: Up, tmp_path: Path) -> None:
    """``ascl serve`` over the index ``ascl up`` built, same model and precision: one serve path, one repository."""
    index = Path(next(line.split(" at ", 1)[1] for line in running.output().splitlines()
                      if line.startswith("index:   ")))
    up_repository = running.cache / "triton" / index.name
    repository = tmp_path / "models"
    args = ["--index", str(index), "--repository", str(repository)]
    for flag in ("--grpc-port", "--http-port", "--metrics-port"):
        args += [flag, str(free_port())]
    env = {**os.environ, "ASCL_CACHE": str(running.cache), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    proc, lines = serve_until_ready(args, env)
    try:
        ours, theirs = repository_files(repository), repository_files(up_repository)
        assert sorted(ours) == sorted(theirs) and len(ours) > 20
        assert [name for name in ours if ours[name] != theirs[name]] == []
        assert any(line.startswith("model: ") and f"the model {index} was built with" in line for line in lines), lines
    finally:
        stop(proc)


@pytest.mark.triton
def test_warm_start_is_cached_and_sigterm_stops_everything(running: Up, workdir: Path, digits_folder: Path) -> None:
    """A second ``ascl up`` on the first one's cache (beside it, on other ports) finds the export and the
    index there; SIGTERM then stops its whole process tree (the shared one is stopped in teardown)."""
    warm = start_up(workdir, digits_folder, running.cache)
    try:
        text = warm.output()
        assert "index:   cached" in text and "ONNX cached" in text
        assert len(alive(warm.seen)) >= 2  # tritonserver and at least one stub
    finally:
        assert stop_up(warm) == 0
    assert "stopped" in warm.output()
    deadline = time.monotonic() + 10
    while alive(warm.seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(warm.seen) == set(), f"left running: {alive(warm.seen)}"
    assert running.process.poll() is None  # the other one is still up
