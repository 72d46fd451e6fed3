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
import tempfile
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
ADDS_PER_CLIENT = 5  # the page's add quota per visitor, small so that a test reaches it


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
    args = [sys.executable, "-m", "ascl", "up", "--gallery", str(gallery), "--cache", str(cache),
            "--max-adds-per-client", str(ADDS_PER_CLIENT)]
    for name, port in ports.items():
        args += [f"--{name}", str(port)]
    log = workdir / f"up-{len(list(workdir.glob('up-*.log')))}.log"
    # the page's own uploads folder: not one that an in-process demo test set for this process
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
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


def gradio_call(up: Up, api: str, data: list[object], *, raw_body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(HTTP status, the event stream's text) of one call to the page's API, as a raw client sends it."""
    import json
    import urllib.error
    import urllib.request

    body = raw_body if raw_body is not None else json.dumps({"data": data}).encode()
    request = urllib.request.Request(f"{up.demo_url}gradio_api/call/{api}", data=body,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            event = json.loads(resp.read())["event_id"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    with urllib.request.urlopen(f"{up.demo_url}gradio_api/call/{api}/{event}", timeout=120) as resp:
        return resp.status, resp.read().decode(errors="replace")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def data_url(data: bytes) -> dict[str, object]:
    import base64

    return {"url": "data:image/png;base64," + base64.b64encode(data).decode(), "meta": {"_type": "gradio.FileData"}}


@pytest.mark.triton
def test_the_page_refuses_large_bodies_before_reading_them(running: Up) -> None:
    """Issue: four 400 MiB data: URLs to /add grew the tree to 6.5 GB and kept 5 GB. Every body is
    bounded before it is read: an API call's JSON at 1 MiB, an upload at the 20 MiB image limit."""
    import http.client

    before = rss_mib(running.process.pid)
    big = data_url(b"\x89PNG" + bytes(3 * 2**19))  # 2 MiB of base64 inside a JSON call
    began = time.monotonic()
    for _ in range(4):
        status, text = gradio_call(running, "add", [big, "x"])
        assert status == 413 and "upload larger images as files" in text, (status, text[:300])
    assert time.monotonic() - began < 20
    for claimed, kind in ((400 * 2**20, "application/json"), (400 * 2**20, "multipart/form-data; boundary=x")):
        conn = http.client.HTTPConnection("127.0.0.1", running.ports["port"], timeout=30)
        path = "/gradio_api/upload" if kind.startswith("multipart") else "/gradio_api/call/add"
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", kind)
        conn.putheader("Content-Length", str(claimed))
        conn.endheaders()  # claims 400 MiB, sends none of it: refused on the claim alone
        assert conn.getresponse().status == 413
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", running.ports["port"], timeout=30)  # chunked: no claim
    conn.putrequest("POST", "/gradio_api/call/add")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"[" * 2**16
    try:
        for _ in range(24):  # 1.5 MiB in all, refused once it passes 1 MiB
            conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        conn.send(b"0\r\n\r\n")
        assert conn.getresponse().status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused and closed while it was still sending: as good
    finally:
        conn.close()
    assert rss_mib(running.process.pid) - before < 100, f"the page grew {rss_mib(running.process.pid) - before:.0f} MiB"


@pytest.mark.triton
def test_a_small_data_url_is_searched_and_links_are_never_fetched(running: Up, digits_folder: Path) -> None:
    query = sorted(digits_folder.rglob("*.png"))[7]
    status, text = gradio_call(running, "search", [data_url(query.read_bytes()), 3, "any"])
    assert status == 200 and "3 results in" in text, text[:300]
    assert query.relative_to(digits_folder).as_posix() in text
    status, text = gradio_call(running, "search", [{"url": "http://127.0.0.1:9/x.png",
                                                   "meta": {"_type": "gradio.FileData"}}, 3, "any"])
    assert "not fetched" in text, text[:300]


@pytest.mark.triton
def test_results_name_no_server_path(running: Up, digits_folder: Path, workdir: Path) -> None:
    from gradio_client import Client as PageClient
    from gradio_client import handle_file

    from ascl.serving import Client

    query = sorted(digits_folder.rglob("*.png"))[3]
    (hits,) = Client(running.grpc).search([query.read_bytes()], k=10)
    shown = str([h.metadata for h in hits])
    assert str(digits_folder) not in shown and str(workdir) not in shown and "'/" not in shown, shown[:300]
    assert hits[0].metadata["source"] == digits_folder.name
    _, _, raw = PageClient(running.demo_url, verbose=False).predict(handle_file(str(query)), 10, api_name="/search")
    assert all(not str(r["name"]).startswith("/") for r in raw) and raw[0]["name"] == query.relative_to(
        digits_folder).as_posix()


@pytest.mark.triton
def test_adds_per_visitor_are_bounded(running: Up, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    from ascl.serving import Client as SearchClient

    client = Client(running.demo_url, verbose=False)
    refused = None
    for seed in range(100, 100 + ADDS_PER_CLIENT + 1):
        image = tmp_path / f"{seed}.png"
        image.write_bytes(png_bytes(seed))
        status, _ = client.predict(handle_file(str(image)), "", api_name="/add")
        if "limit per visitor" in status:
            refused = image
            break
        assert "Added as id" in status, status
    assert refused is not None, f"{ADDS_PER_CLIENT + 1} adds from one visitor were all taken"
    (hits,) = SearchClient(running.grpc).search([refused.read_bytes()], k=10)
    assert refused.name not in {h.metadata.get("original_name") for h in hits}  # the refused image was not added


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


def uploads_after_a_search(up: Up, gallery: Path) -> list[Path]:
    """The page's uploads folder (uploads and thumbnails: made by its first search), checked to be one."""
    from gradio_client import Client as PageClient
    from gradio_client import handle_file

    query = sorted(gallery.rglob("*.png"))[5]
    PageClient(up.demo_url, verbose=False).predict(handle_file(str(query)), 3, api_name="/search")
    uploads = list(Path(tempfile.gettempdir()).glob(f"ascl-demo-uploads-{up.process.pid}-*"))
    assert len(uploads) == 1 and any(uploads[0].rglob("*.png")), uploads
    return uploads


@pytest.mark.triton
def test_warm_start_is_cached_and_sigterm_stops_everything(running: Up, workdir: Path, digits_folder: Path) -> None:
    """A second ``ascl up`` on the first one's cache (beside it, on other ports) finds the export and the
    index there; SIGTERM then stops its whole process tree (the shared one is stopped in teardown)."""
    warm = start_up(workdir, digits_folder, running.cache)
    try:
        text = warm.output()
        assert "index:   cached" in text and "ONNX cached" in text
        assert len(alive(warm.seen)) >= 2  # tritonserver and at least one stub
        uploads = uploads_after_a_search(warm, digits_folder)
    finally:
        assert stop_up(warm) == 0
    assert "stopped" in warm.output()
    deadline = time.monotonic() + 10
    while alive(warm.seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(warm.seen) == set(), f"left running: {alive(warm.seen)}"
    assert not uploads[0].exists(), "the page's uploads were left behind"
    assert running.process.poll() is None  # the other one is still up


@pytest.mark.triton
def test_a_killed_up_is_cleaned_by_the_next_and_exhausted_restarts_end_it_with_the_reason(
        running: Up, workdir: Path, digits_folder: Path, tmp_path: Path) -> None:
    """kill -9 of ``ascl up`` cannot clean up: its Triton goes (parent-death signal) and the next start
    removes its uploads folder. Then Triton killed with the index damaged: every restart fails, and
    ``ascl up`` stops everything and exits 1 with the reason."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(running.cache, cache)  # warm: model, gallery and index are cached
    first = start_up(workdir, digits_folder, cache)
    try:
        uploads = uploads_after_a_search(first, digits_folder)
    finally:
        first.process.kill()
        first.process.wait()
    deadline = time.monotonic() + 60
    while alive(first.seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive(first.seen) == set()
    assert not list(Path("/dev/shm").glob(f"ascl_{first.process.pid}_*"))

    second = start_up(workdir, digits_folder, cache)
    try:
        assert not uploads[0].exists(), "the killed page's uploads are still there"
        (index,) = [p for p in (cache / "indexes").iterdir() if p.is_dir()]
        faiss_file = next(index.glob("index*.faiss"))
        with open(faiss_file, "r+b") as fh:
            fh.truncate(100)
        triton = [pid for pid, _ in alive(descendants(second.process.pid))
                  if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"tritonserver")]
        assert len(triton) == 1
        os.kill(triton[0], signal.SIGKILL)
        code = second.process.wait(timeout=300)
    finally:
        if second.process.poll() is None:
            second.process.kill()
    text = second.output().strip()
    assert code == 1, text[-3000:]
    last = text.splitlines()[-1]
    assert "could not be restarted" in last and faiss_file.name in last, last
    time.sleep(0.5)
    assert alive(second.seen) == set()
