"""``ascl serve``'s service against a hostile client and an unlucky operator, on the real ``tritonserver``.

One service for the module (front door on free public ports, Triton on private ones, the
supervisor on). Each test is a problem that the service once had: control APIs open to
clients, a dead stub taking the service down, a tiny image that decodes huge, unbounded
requests, a malformed request failing others, INTERNAL for bad input.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import free_port
from PIL import Image
from serving_helpers import processes_mentioning, served_until_teardown, under_load, wait_until
from tritonclient.utils import InferenceServerException

from ascl import names
from ascl.images import list_images
from ascl.serving import Client
from ascl.serving.online.limits import Limits
from ascl.serving.online.repository import write_repository
from ascl.serving.online.server import ADMIN_KEY_HEADER
from ascl.serving.online.service import SearchService, Supervision

pytestmark = pytest.mark.triton
MAX_REQUEST = 8 * 2**20  # small, so that the over-limit test sends little


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, random_onnx: Path,
            digits_index: Path) -> Iterator[SearchService]:
    """A service of its own (small request limit, a probe every second; one test kills a stub) over the
    session's digits index, which it only reads."""
    root = tmp_path_factory.mktemp("hardened")
    repo = write_repository(root / "models", random_onnx, digits_index, max_request_bytes=MAX_REQUEST)
    events: list[str] = []
    svc = SearchService(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                        limits=Limits(max_request_bytes=MAX_REQUEST),
                        supervision=Supervision(probe_every_s=1.0, probe_timeout_s=10.0), log=events.append)
    svc.events_log = events  # type: ignore[attr-defined]
    yield from served_until_teardown(svc)


def png(size: tuple[int, int] = (32, 32), colour: tuple[int, int, int] = (200, 30, 90), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def http(service: SearchService, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         base: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"{base or service.http_url}{path}", data=body if method == "POST" else None,
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def search_inputs(images: list[bytes], k: int = 3) -> list[grpcclient.InferInput]:
    image = grpcclient.InferInput(names.IMAGE_BYTES, [len(images), 1], "BYTES")
    image.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_).reshape(len(images), 1))
    top_k = grpcclient.InferInput(names.TOP_K, [len(images), 1], "INT32")
    top_k.set_data_from_numpy(np.full((len(images), 1), k, dtype=np.int32))
    return [image, top_k]


def private_http(service: SearchService) -> str:
    assert service.triton is not None
    return f"http://127.0.0.1:{service.triton.ports['http']}"


EVIL_CONFIG = 'name: "evil"\nbackend: "python"\nmax_batch_size: 0\n' \
              'input [{name: "X", data_type: TYPE_FP32, dims: [1]}]\noutput [{name: "Y", data_type: TYPE_FP32, dims: [1]}]'


def evil_load_body(marker: Path) -> bytes:
    code = f"open({str(marker)!r}, 'w').write('ran')\nclass TritonPythonModel:\n    pass\n"
    return json.dumps({"parameters": {"config": EVIL_CONFIG,
                                      "file:1/model.py": base64.b64encode(code.encode()).decode()}}).encode()


def test_uploaded_model_code_is_refused_everywhere_and_never_runs(service: SearchService, tmp_path: Path) -> None:
    marker = tmp_path / "evil-ran"
    body = evil_load_body(marker)
    json_type = {"Content-Type": "application/json"}
    status, text = http(service, "POST", "/v2/repository/models/evil/load", body, json_type)
    assert status == 403 and "not served on this port" in text
    # gRPC on the public port: refused before Triton sees it
    with grpcclient.InferenceServerClient(service.grpc_url) as client, pytest.raises(InferenceServerException) as err:
        client.load_model("evil", config=EVIL_CONFIG, files={"file:1/model.py": b"import os"})
    assert err.value.status() == "StatusCode.PERMISSION_DENIED"
    # Triton's own (private) port: without the admin key it is a restricted API ...
    status, text = http(service, "POST", "/v2/repository/models/evil/load", body, json_type, base=private_http(service))
    assert status in (401, 403), (status, text)
    # ... and even with the key nothing can be loaded: every model was loaded at start
    keyed = {**json_type, ADMIN_KEY_HEADER: str(service.admin_key)}
    status, text = http(service, "POST", "/v2/repository/models/evil/load", body, keyed, base=private_http(service))
    assert status >= 400 and "not allowed" in text.lower(), (status, text)
    status, text = http(service, "POST", "/v2/repository/index", b"{}", keyed, base=private_http(service))
    assert status == 200 and names.MODEL_IMAGE_SEARCH in text and "evil" not in text, text  # never loaded
    assert not marker.exists()


def test_unload_is_refused_and_the_service_keeps_answering(service: SearchService) -> None:
    status, _ = http(service, "POST", f"/v2/repository/models/{names.MODEL_IMAGE_SEARCH}/unload", b"{}",
                     {"Content-Type": "application/json"})
    assert status == 403
    with grpcclient.InferenceServerClient(service.grpc_url) as client:
        with pytest.raises(InferenceServerException) as err:
            client.unload_model(names.MODEL_IMAGE_SEARCH)
        assert err.value.status() == "StatusCode.PERMISSION_DENIED"
        assert client.is_model_ready(names.MODEL_IMAGE_SEARCH)
    with Client(service.grpc_url) as c:
        assert len(c.search([png()], k=3)[0]) == 3
    assert http(service, "GET", "/v2/health/ready")[0] == 200


@pytest.mark.parametrize("path", ["/v2/logging", "/v2/trace/setting", "/v2/systemsharedmemory/status",
                                  "/v2/models/stats", f"/v2/models/{names.MODEL_SEARCH}/config",
                                  "/v2/repository/index"])
def test_control_and_introspection_apis_are_closed(service: SearchService, path: str) -> None:
    method = "POST" if path in ("/v2/repository/index",) else "GET"
    status, text = http(service, method, path, b"{}", {"Content-Type": "application/json"})
    assert status == 403 and "index_dir" not in text


def test_grpc_control_calls_are_refused(service: SearchService) -> None:
    with grpcclient.InferenceServerClient(service.grpc_url) as client:
        for call in (client.get_log_settings, client.get_trace_settings, client.get_system_shared_memory_status,
                     client.get_inference_statistics, client.get_model_repository_index,
                     lambda: client.get_model_config(names.MODEL_SEARCH)):
            with pytest.raises(InferenceServerException) as err:
                call()
            assert err.value.status() == "StatusCode.PERMISSION_DENIED"
        assert client.get_model_metadata(names.MODEL_IMAGE_SEARCH).name == names.MODEL_IMAGE_SEARCH


def test_web_pages_cannot_send_requests(service: SearchService) -> None:
    body = json.dumps({"inputs": []}).encode()
    path = f"/v2/models/{names.MODEL_EMBED}/infer"
    status, _ = http(service, "POST", path, body, {"Content-Type": "text/plain"})
    assert status == 415
    status, _ = http(service, "POST", path, body, {"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert status == 403


def test_a_tiny_file_that_decodes_huge_is_refused_quickly_with_bounded_memory(service: SearchService) -> None:
    tall = png((1, 1_000_000), mode="L")
    assert len(tall) < 10_000
    started = time.monotonic()
    with grpcclient.InferenceServerClient(service.grpc_url) as client, pytest.raises(InferenceServerException) as err:
        client.infer(names.MODEL_IMAGE_SEARCH, search_inputs([tall]))
    assert time.monotonic() - started < 10
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "aspect ratio" in str(err.value)
    wide = png((3000, 40))  # 75:1: within limits, decoded by cropping before scaling
    with Client(service.grpc_url) as c:
        assert len(c.search([wide], k=2)[0]) == 2
    decoders = processes_mentioning(f"{service.repository}/{names.MODEL_IMAGE_SEARCH}")  # it decoded the request
    peak_kib = max(_peak_rss_kib(pid) for pid in decoders)
    assert peak_kib < 600 * 1024, f"image_search peaked at {peak_kib / 1024:.0f} MiB"


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _shm_bytes() -> int:
    return sum(p.stat().st_size for p in Path("/dev/shm").iterdir() if p.is_file())


def test_a_request_over_the_size_limit_is_refused_before_it_is_read(service: SearchService) -> None:
    big = os.urandom(MAX_REQUEST // 3)
    before = _shm_bytes()
    with grpcclient.InferenceServerClient(service.grpc_url) as client, pytest.raises(InferenceServerException) as err:
        client.infer(names.MODEL_EMBED, search_inputs([big, big, big, big])[:1])
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    with Client(service.http_url, protocol="http") as c, pytest.raises(InferenceServerException) as http_err:
        c.embed([big, big, big, big])
    assert "413" in str(http_err.value) or "limit" in str(http_err.value)
    assert _shm_bytes() - before < MAX_REQUEST  # nothing of the refused requests reached the stubs
    with Client(service.grpc_url) as c:  # under the limit, still served
        assert c.embed([png()]).shape[0] == 1


def test_empty_requests_mixed_into_load_fail_no_good_request(service: SearchService, digits_folder: Path) -> None:
    good = [p.read_bytes() for p in list_images(digits_folder)[:16]]
    failures: list[str] = []
    empty_errors: list[str] = []
    stop = threading.Event()
    served = [0]

    def good_load() -> None:
        with Client(service.grpc_url) as c:
            i = 0
            while not stop.is_set():
                try:
                    assert len(c.search([good[i % 16]], k=3)[0]) == 3
                    served[0] += 1
                except Exception as exc:  # a failed good request is the finding
                    failures.append(str(exc)[:200])
                i += 1

    def empty_load() -> None:
        with grpcclient.InferenceServerClient(service.grpc_url) as client:
            while not stop.is_set():
                inp = grpcclient.InferInput(names.IMAGE_BYTES, [0, 1], "BYTES")
                inp.set_data_from_numpy(np.zeros((0, 1), dtype=np.object_))
                try:
                    client.infer(names.MODEL_EMBED, [inp])
                except InferenceServerException as exc:
                    empty_errors.append(str(exc.status()))

    workers = [threading.Thread(target=good_load) for _ in range(6)] + [threading.Thread(target=empty_load)
                                                                        for _ in range(3)]
    for w in workers:
        w.start()
    try:  # until both kinds of request have been sent many times, side by side
        wait_until(lambda: served[0] > 40 and len(empty_errors) > 20 or bool(failures), 120, "mixed load")
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert failures == [] and served[0] > 40
    assert empty_errors and set(empty_errors) == {"StatusCode.INVALID_ARGUMENT"}


def test_bad_input_is_invalid_argument_over_grpc_and_400_over_http(service: SearchService) -> None:
    corrupt = b"\x89PNG\r\n\x1a\n" + b"garbage" * 50
    with grpcclient.InferenceServerClient(service.grpc_url) as client, pytest.raises(InferenceServerException) as err:
        client.infer(names.MODEL_IMAGE_SEARCH, search_inputs([corrupt]))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "0x" not in str(err.value) and "BytesIO" not in str(err.value)
    with Client(service.http_url, protocol="http") as c, pytest.raises(InferenceServerException) as http_err:
        c.embed([corrupt])
    assert "400" in str(http_err.value.status())


def test_a_killed_stub_is_restarted_and_only_in_flight_requests_fail(service: SearchService,
                                                                      digits_folder: Path) -> None:
    good = [p.read_bytes() for p in list_images(digits_folder)[:16]]
    restarts_before = service.events.restarts

    def kill_stubs() -> None:
        stubs = processes_mentioning(f"{service.repository}/{names.MODEL_IMAGE_SEARCH}")  # the ones serving the load
        assert stubs, "no image_search stub found"
        for pid in stubs:
            os.kill(pid, signal.SIGKILL)

    outcomes, recovered = under_load(service, good, kill_stubs, recover_within_s=45)
    assert "ok" in outcomes[8:], (f"not answering {recovered:.0f} s after the stub was killed; supervisor said: "
                                  f"{service.events_log[-8:]}")  # type: ignore[attr-defined]
    assert recovered < 45
    print(f"answering again {recovered:.1f} s after the kill; supervisor restarts: {service.events.restarts} "
          f"({service.events.reasons})")
    assert service.events.restarts > restarts_before, "a dead stub must get a fresh server"
    failed = [o for o in outcomes if o != "ok"]
    assert {f.split(":")[0] for f in failed} <= {"StatusCode.UNAVAILABLE"}, failed[:5]
    assert len(failed) <= 4 * 2, failed  # at most what was in flight (4 clients, a probe in between)
    assert processes_mentioning(f"{service.repository}/{names.MODEL_IMAGE_SEARCH}")  # a live stub again


def test_grpc_errors_of_the_front_door_are_real_statuses(service: SearchService) -> None:
    """Streaming inference and methods the door does not forward are refused with PERMISSION_DENIED,
    not failed with INTERNAL or left UNIMPLEMENTED."""
    with grpc.insecure_channel(service.grpc_url) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        with pytest.raises(grpc.RpcError) as err:
            list(stream(iter([b""]), timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
        for method in ("/inference.GRPCInferenceService/RepositoryModelLoad", "/inference.Unknown/Call"):
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(method)(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err.value)
