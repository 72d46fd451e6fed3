"""The supervisor beyond a killed stub, on the real ``tritonserver``: tritonserver itself killed or
stopped under load, the supervisor's own checks failing, a flood of connections on a small
descriptor limit, every restart failing, and start-up errors that name their cause.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from serving_helpers import (
    export_random_encoder,
    process_state,
    processes_mentioning,
    served_until_teardown,
    supervised_service,
    under_load,
)
from tritonclient.utils import InferenceServerException

from ascl.images import list_images
from ascl.serving import Client
from ascl.serving.collections.build import build_index
from ascl.serving.online.server import TritonServer
from ascl.serving.online.service import SearchService, Supervision

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def model_and_index(tmp_path_factory: pytest.TempPathFactory, digits_folder: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("supervisor")
    onnx_path = export_random_encoder(root / "encoder.onnx")
    build_index(onnx_path, str(digits_folder), root / "idx", progress=False)
    return onnx_path, root / "idx"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, digits_folder: Path) -> Iterator[SearchService]:
    svc = supervised_service(tmp_path_factory.mktemp("supervised"), digits_folder, supervision=Supervision(
        probe_every_s=1.0, probe_timeout_s=10.0, stopped_after_s=1.0))
    yield from served_until_teardown(svc)


def test_a_killed_tritonserver_is_restarted_under_load(service: SearchService, digits_folder: Path) -> None:
    images = [p.read_bytes() for p in list_images(digits_folder)[:16]]
    before = service.events.restarts
    assert service.triton is not None and service.triton.process is not None
    pid = service.triton.process.pid
    after, recovered = under_load(service, images, lambda: os.kill(pid, signal.SIGKILL))
    assert "ok" in after[8:], (f"not answering {recovered:.0f} s after tritonserver was killed; supervisor said: "
                               f"{service.events_log[-8:]}")  # type: ignore[attr-defined]
    assert service.events.restarts > before and "exited" in service.events.reasons[-1]
    failed = [o for o in after if o != "ok"]
    assert {f.split(":")[0] for f in failed} <= {"StatusCode.UNAVAILABLE"}, failed[:5]
    assert len(failed) <= 8, failed  # at most what was inside the dead server (4 clients, a probe)
    assert service.triton is not None and service.triton.process is not None and service.triton.process.pid != pid


def test_a_stopped_tritonserver_is_restarted_under_load(service: SearchService, digits_folder: Path) -> None:
    images = [p.read_bytes() for p in list_images(digits_folder)[:16]]
    before = service.events.restarts
    assert service.triton is not None and service.triton.process is not None
    pid = service.triton.process.pid
    after, recovered = under_load(service, images, lambda: os.kill(pid, signal.SIGSTOP))
    assert "ok" in after[8:], (f"not answering {recovered:.0f} s after tritonserver was stopped; supervisor said: "
                               f"{service.events_log[-8:]}")  # type: ignore[attr-defined]
    assert recovered < 40
    assert service.events.restarts > before and "stopped" in service.events.reasons[-1], service.events.reasons
    failed = [o for o in after if o != "ok"]
    assert {f.split(":")[0] for f in failed} <= {"StatusCode.UNAVAILABLE"}, failed[:5]
    assert process_state(pid) in (None, "Z")


def test_the_supervisor_survives_its_own_errors(service: SearchService, digits_folder: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Its checks raising (here /proc unreadable, as when descriptors run out) are logged at a bounded
    rate and checked again; a Triton killed afterwards is still restarted."""
    def unreadable(self: TritonServer) -> set[int]:
        raise OSError(24, "Too many open files", "/proc")

    logged = len(service.events_log)  # type: ignore[attr-defined]
    monkeypatch.setattr(TritonServer, "lost_stubs", unreadable)
    time.sleep(4)
    monkeypatch.undo()
    assert service._supervisor is not None and service._supervisor.is_alive()
    errors = [e for e in service.events_log[logged:] if "a check failed" in e]  # type: ignore[attr-defined]
    assert 1 <= len(errors) <= 2 and "Too many open files" in errors[0], service.events_log[logged:]  # type: ignore[attr-defined]
    images = [p.read_bytes() for p in list_images(digits_folder)[:16]]
    assert service.triton is not None and service.triton.process is not None
    pid = service.triton.process.pid
    after, recovered = under_load(service, images, lambda: os.kill(pid, signal.SIGKILL))
    assert "ok" in after[8:], f"not answering {recovered:.0f} s after the kill"


# ---------------------------------------------------------------- ascl serve as a process


def serve(args: list[str], *, nofile: int | None = None) -> subprocess.Popen[str]:
    def limit() -> None:  # pragma: no cover - runs in the child
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.Popen([sys.executable, "-m", "ascl", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=limit)


def ports() -> dict[str, int]:
    return {"grpc": free_port(), "http": free_port(), "metrics": free_port()}


def port_args(p: dict[str, int]) -> list[str]:
    return ["--grpc-port", str(p["grpc"]), "--http-port", str(p["http"]), "--metrics-port", str(p["metrics"])]


def wait_ready(proc: subprocess.Popen[str], lines: list[str]) -> threading.Thread:
    """Read ``proc``'s output into ``lines`` until it is ready; a thread reads the rest (join it)."""
    out = proc.stdout
    assert out is not None
    for line in out:
        lines.append(line)
        if line.startswith("ready:"):
            reader = threading.Thread(target=lambda: lines.extend(out), daemon=True)
            reader.start()
            return reader
    pytest.fail(f"ascl serve exited with {proc.wait()} before ready:\n{''.join(lines)[-3000:]}")


def tritonserver_pid(repo: Path) -> int:
    found = [pid for pid in processes_mentioning(f"--model-repository={repo}")
             if "tritonserver" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(found) == 1, found
    return found[0]


def test_a_connection_flood_on_a_small_descriptor_limit_leaves_crash_recovery_working(
        model_and_index: tuple[Path, Path], tmp_path: Path, digits_folder: Path) -> None:
    """Issue: ~21,000 idle connections exhausted the descriptors, the supervisor thread died on EMFILE,
    and a killed tritonserver was never restarted. Here with RLIMIT_NOFILE 400 for the server: many
    more idle connections than that, then tritonserver killed; the service answers again, and its log
    stays small."""
    onnx_path, index = model_and_index
    p = ports()
    repo = tmp_path / "models"
    lines: list[str] = []
    proc = serve(["--model", str(onnx_path), "--index", str(index), *port_args(p), "--repository", str(repo)],
                 nofile=400)
    flood: list[socket.socket] = []
    try:
        wait_ready(proc, lines)
        query = list_images(digits_folder)[0].read_bytes()
        with Client(f"127.0.0.1:{p['grpc']}") as kept:  # a client connected before the flood
            assert len(kept.search([query], k=3)[0]) == 3
            for _ in range(300):
                for port in (p["grpc"], p["http"]):
                    with contextlib.suppress(OSError):  # refused or reset: the cap at work
                        flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(1)
            killed = tritonserver_pid(repo)
            os.kill(killed, signal.SIGKILL)
            deadline = time.monotonic() + 90
            answered = False
            while time.monotonic() < deadline and not answered:
                try:
                    answered = len(kept.search([query], k=3)[0]) == 3
                except InferenceServerException:
                    time.sleep(0.5)
            assert answered, "".join(lines)[-3000:]
            assert tritonserver_pid(repo) != killed
        for s in flood:
            s.close()
        flood.clear()
        time.sleep(1)
        with Client(f"127.0.0.1:{p['grpc']}") as fresh:  # new clients are served again
            assert len(fresh.search([query], k=3)[0]) == 3
        text = "".join(lines)
        assert "restarting tritonserver" in text and "serving again" in text
        assert len(text) < 64_000, f"the log grew to {len(text)} characters"
    finally:
        for s in flood:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
    assert proc.returncode == 0 and processes_mentioning(str(repo)) == []


def test_every_restart_failing_ends_ascl_serve_with_the_reason(model_and_index: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    onnx_path, index = model_and_index
    damaged = tmp_path / "idx"
    shutil.copytree(index, damaged)
    repo = tmp_path / "models"
    lines: list[str] = []
    proc = serve(["--model", str(onnx_path), "--index", str(damaged), *port_args(ports()), "--repository", str(repo)])
    try:
        reader = wait_ready(proc, lines)
        faiss_file = next(damaged.glob("index*.faiss"))
        with open(faiss_file, "r+b") as fh:  # every later start fails to load it
            fh.truncate(100)
        os.kill(tritonserver_pid(repo), signal.SIGKILL)
        proc.wait(240)
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines).strip()
    last = text.splitlines()[-1]
    assert proc.returncode == 1, text[-3000:]
    assert "could not be restarted after 3 attempts" in last and faiss_file.name in last and "truncated" in last, last
    assert "Traceback" not in text
    assert processes_mentioning(str(repo)) == []
    assert not _left_behind(proc.pid, damaged)


def _left_behind(pid: int, index: Path) -> list[Path]:
    """Temporary Triton logs that mention ``index`` and /dev/shm regions of process ``pid``'s Triton."""
    logs = [p for p in Path(tempfile.gettempdir()).glob("tritonserver.*.log")
            if str(index) in p.read_text(errors="replace")]
    return logs + list(Path("/dev/shm").glob(f"ascl_{pid}_*"))


@pytest.mark.parametrize("damage", ["faiss", "metadata"])
def test_a_damaged_index_at_start_names_the_file_and_cause_last(model_and_index: tuple[Path, Path], tmp_path: Path,
                                                                damage: str) -> None:
    onnx_path, index = model_and_index
    damaged = tmp_path / "idx"
    shutil.copytree(index, damaged)
    if damage == "faiss":
        broken = next(damaged.glob("index*.faiss"))
        with open(broken, "r+b") as fh:
            fh.truncate(100)
    else:
        broken = next(damaged.glob("metadata*.jsonl"))
        broken.write_text(broken.read_text()[:-40] + "\n{not json\n")
    proc = subprocess.Popen([sys.executable, "-m", "ascl", "serve", "--model", str(onnx_path), "--index",
                             str(damaged), *port_args(ports())], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate(timeout=300)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    assert broken.name in last and ("truncated" in last or "damaged metadata" in last), last
    assert "CUDA" not in err
    assert not _left_behind(proc.pid, damaged)
