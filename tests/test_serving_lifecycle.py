"""`ascl serve` as a process: fails fast with clear messages, and SIGTERM under load completes
the requests already in flight, then exits with nothing left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, fresh_cache
from serving_helpers import export_random_encoder, processes_mentioning
from tritonclient.utils import InferenceServerException

from ascl.images import list_images
from ascl.serving import Client
from ascl.serving.collections.build import build_index


@pytest.fixture(scope="module")
def model_and_index(tmp_path_factory: pytest.TempPathFactory, digits_folder: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lifecycle")
    onnx_path = export_random_encoder(root / "encoder.onnx", width=64)  # full width: slow enough to be in flight
    build_index(onnx_path, str(digits_folder), root / "idx", progress=False)
    return onnx_path, root / "idx"


def serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ascl", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def ports() -> list[str]:
    return ["--grpc-port", str(free_port()), "--http-port", str(free_port()), "--metrics-port", str(free_port())]


def test_missing_model_index_or_busy_port_fail_fast(model_and_index: tuple[Path, Path], tmp_path: Path) -> None:
    onnx_path, index = model_and_index
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = str(busy.getsockname()[1])
        cases = {
            "no such ONNX file": ["--model", str(tmp_path / "nope.onnx"), "--index", str(index), *ports()],
            "not an index folder": ["--model", str(onnx_path), "--index", str(tmp_path), *ports()],
            f"port {busy_port} (--http-port) is in use": [
                "--model", str(onnx_path), "--index", str(index), *ports(), "--http-port", busy_port],
        }
        for message, args in cases.items():
            start = time.monotonic()
            proc = serve(*args)
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 2, out
            assert message in out and "Traceback" not in out
            assert time.monotonic() - start < 30


@pytest.mark.triton
def test_sigterm_under_load_completes_in_flight(model_and_index: tuple[Path, Path], digits_folder: Path,
                                                tmp_path: Path) -> None:
    """SIGTERM while requests are in flight (sent, none answered yet): all of them complete,
    a request sent during the shutdown gets UNAVAILABLE, and afterwards the port refuses
    connections; nothing is left running."""
    onnx_path, index = model_and_index
    repo = tmp_path / "models"
    grpc_port = free_port()
    proc = serve("--model", str(onnx_path), "--index", str(index), *ports(), "--grpc-port", str(grpc_port),
                 "--repository", str(repo))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ready:"):
                break
        else:
            pytest.fail(f"ascl serve exited with {proc.wait()} before ready")
        url = f"127.0.0.1:{grpc_port}"
        images = list_images(digits_folder)[:64]
        results: list[object] = []
        sent = [threading.Event() for _ in range(6)]

        def one_request(i: int) -> None:
            try:
                with Client(url, timeout_s=120) as c:
                    c.is_ready()  # connected before the request goes
                    sent[i].set()
                    results.append(len(c.search(images, k=3)))  # 64 images: slow enough to be in flight
            except Exception as exc:  # recorded: an in-flight request that failed
                results.append(exc)

        threads = [threading.Thread(target=one_request, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in sent)
        time.sleep(0.3)  # the six requests are on the wire; the server needs seconds for 384 images
        answered_before_signal = len(results)
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        late: list[str] = []
        with Client(url, timeout_s=30) as c:  # a new request while the server drains
            try:
                c.search(images[:1], k=1)
                late.append("served")
            except InferenceServerException as exc:
                late.append(str(exc.status()))
        for t in threads:
            t.join(120)
        rest, _ = proc.communicate(timeout=90)
        assert answered_before_signal == 0, "the requests were not in flight when the signal went"
        assert results == [64] * 6, [str(r)[:300] for r in results]
        assert late == ["StatusCode.UNAVAILABLE"], late
        assert proc.returncode == 0 and "stopping" in rest
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", grpc_port), timeout=5):
            pass
        assert processes_mentioning(str(repo)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.triton
def test_a_killed_serve_leaves_no_repository_behind(model_and_index: tuple[Path, Path], tmp_path: Path) -> None:
    """kill -9 of ``ascl serve`` cannot clean up; the next ``ascl serve`` removes what it left."""
    onnx_path, index = model_and_index
    env = {**os.environ, "ASCL_CACHE": str(fresh_cache(tmp_path / "cache"))}
    grpc_port = free_port()
    args = ["--model", str(onnx_path), "--index", str(index), *ports(), "--grpc-port", str(grpc_port)]

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "ascl", "serve", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ready:"):
                return proc
        pytest.fail(f"ascl serve exited with {proc.wait()} before ready")

    first = start()
    left = list((tmp_path / "cache" / "serve").glob(f"repo-{first.pid}-*"))
    assert len(left) == 1
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 30  # its tritonserver dies with it (parent-death signal)
    while processes_mentioning(str(left[0])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left[0].exists()
    second = start()
    try:
        assert not left[0].exists()
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=90)
