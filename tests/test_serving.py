"""The real Triton server (CPU) serving a real index: parity, neighbours, bad input, live updates.

One server for the whole module; it is always stopped and leaves no process behind.
"""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import free_port
from PIL import Image
from serving_helpers import export_random_encoder, precision_at_k, processes_mentioning
from tritonclient.utils import InferenceServerException

from ascl import names
from ascl.cli import main
from ascl.export.runtime import OnnxEmbedder
from ascl.images import list_images, load_image
from ascl.serving import Client, TritonServer
from ascl.serving.collections.build import build_index
from ascl.serving.online.repository import write_repository


@dataclass
class Served:
    server: TritonServer
    onnx: Path
    index: Path
    gallery: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, digits_folder: Path) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    onnx_path = export_random_encoder(root / "encoder.onnx")
    build_index(onnx_path, str(digits_folder), root / "idx", progress=False)
    repo = write_repository(root / "models", onnx_path, root / "idx")
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    try:
        server.start()
        yield Served(server, onnx_path, root / "idx", digits_folder)
    finally:
        server.stop()
    assert processes_mentioning(str(repo)) == []


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[Client]:
    with Client(served.server.grpc_url) as c:
        yield c


def raw_infer(served: Served, model: str, inputs: list[grpcclient.InferInput]) -> grpcclient.InferResult:
    with grpcclient.InferenceServerClient(served.server.grpc_url) as c:
        return c.infer(model, inputs)


def bytes_input(*items: bytes) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(names.IMAGE_BYTES, [len(items), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b] for b in items], dtype=np.object_).reshape(len(items), 1))
    return inp


def test_health_and_metrics(served: Served) -> None:
    with urllib.request.urlopen(f"{served.server.http_url}/v2/health/ready", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(served.server.metrics_url, timeout=5) as resp:
        assert "nv_inference_request_success" in resp.read().decode()


def test_embeddings_equal_onnxruntime(served: Served, client: Client) -> None:
    files = list_images(served.gallery)[:70]  # more than one request (64 per request)
    remote = client.embed(files)  # [70, 512]
    local = OnnxEmbedder(served.onnx).embed(np.stack([load_image(f, 32) for f in files]))
    assert remote.shape == local.shape == (70, 512)
    np.testing.assert_allclose(remote, local, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(remote, axis=1), 1.0, atol=1e-5)


def test_search_returns_right_neighbours(served: Served, client: Client) -> None:
    files = list_images(served.gallery)
    results = client.search(files, k=11)
    labels = [f.parent.name for f in files]
    label_of: dict[int, str] = {}
    for file, hits in zip(files, results, strict=True):
        assert len(hits) == 11 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert hits[0].metadata["path"] == file.relative_to(served.gallery).as_posix()  # itself first
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        label_of.update({h.id: h.metadata["label"] for h in hits})
    ids = np.array([[h.id for h in hits[1:]] for hits in results])  # [120, 10], self excluded
    # Random-init ResNet-18 conv features (seeded) separate the digits far above chance (0.1).
    assert precision_at_k(ids, labels, label_of) > 0.45


BAD_REQUESTS = [
    ("corrupt bytes", names.MODEL_IMAGE_SEARCH, "not a readable image"),
    ("empty bytes", names.MODEL_EMBED, "empty input"),
    ("50 MB upload", names.MODEL_EMBED, "larger than the 20 MiB limit"),
    ("good and corrupt in one request", names.MODEL_EMBED, "image 1: not a readable image"),
    ("empty request", names.MODEL_EMBED, "size 0"),  # refused by the Python stub itself
    ("k = 0", names.MODEL_IMAGE_SEARCH, "k must be >= 1"),
    ("float32 to encoder", names.MODEL_ENCODER, "FP32"),
    ("wrong shape to encoder", names.MODEL_ENCODER, "shape"),
]


def bad_inputs(case: str, good: bytes) -> list[grpcclient.InferInput]:
    k = 5
    if case == "corrupt bytes":
        inputs = [bytes_input(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)]
    elif case == "empty bytes":
        inputs = [bytes_input(b"")]
    elif case == "50 MB upload":
        inputs = [bytes_input(good + bytes(50 * 2**20))]
    elif case == "good and corrupt in one request":
        inputs = [bytes_input(good, good[: len(good) // 3])]
    elif case == "empty request":
        inp = grpcclient.InferInput(names.IMAGE_BYTES, [0, 1], "BYTES")
        inp.set_data_from_numpy(np.zeros((0, 1), dtype=np.object_))
        inputs = [inp]
    elif case == "k = 0":
        inputs = [bytes_input(good)]
        k = 0
    elif case == "float32 to encoder":
        inp = grpcclient.InferInput(names.IMAGES, [1, 32, 32, 3], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.float32))
        return [inp]
    else:
        inp = grpcclient.InferInput(names.IMAGES, [1, 16, 16, 3], "UINT8")
        inp.set_data_from_numpy(np.zeros((1, 16, 16, 3), np.uint8))
        return [inp]
    if case.startswith("k") or case == "corrupt bytes":
        k_in = grpcclient.InferInput(names.TOP_K, [1, 1], "INT32")
        k_in.set_data_from_numpy(np.array([[k]], dtype=np.int32))
        inputs.append(k_in)
    return inputs


@pytest.mark.parametrize(("case", "model", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_fails_alone(served: Served, client: Client, case: str, model: str, message: str) -> None:
    good = (served.gallery / "7" / "0000.png").read_bytes()
    with pytest.raises(InferenceServerException) as err:
        raw_infer(served, model, bad_inputs(case, good))
    assert message in str(err.value)
    # the client's fault, not INTERNAL; except a request of no image, which Triton's Python stub
    # itself fails while unpacking it (the service's front door refuses it first: test_serving_hardening)
    expected = "StatusCode.INTERNAL" if case == "empty request" else "StatusCode.INVALID_ARGUMENT"
    assert err.value.status() == expected, err.value
    assert "0x" not in str(err.value) and "/tmp" not in str(err.value)  # no addresses, no server paths
    hits = client.search([good], k=3)[0]  # the server keeps answering
    assert hits[0].metadata["path"] == "7/0000.png"


def test_k_larger_than_the_index_is_clamped(served: Served, client: Client) -> None:
    good = (served.gallery / "7" / "0000.png").read_bytes()
    hits = client.search([good], k=100_000)[0]
    assert len(hits) == 120 and hits[0].metadata["path"] == "7/0000.png"


def test_query_cli_and_http_client(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    image = served.gallery / "4" / "0003.png"
    assert main(["query", str(image), "-k", "3", "--server", served.server.grpc_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(image) and "1. id" in out[1] and "4/0003.png" in out[1] and len(out) == 4
    with Client(served.server.http_url, protocol="http") as http:
        assert http.search([image], k=2)[0][0].metadata["path"] == "4/0003.png"
    assert main(["query", str(image), "--server", f"127.0.0.1:{free_port()}"]) == 2


def test_index_update_under_load_loses_nothing(served: Served, tmp_path: Path) -> None:
    new_dir = tmp_path / "new" / "flipped"
    new_dir.mkdir(parents=True)
    for digit in range(10):  # new, unseen images: upside-down digits
        src = Image.open(served.gallery / str(digit) / "0005.png")
        src.transpose(Image.Transpose.ROTATE_180).save(new_dir / f"{digit}.png")
    queries = [f.read_bytes() for f in list_images(served.gallery)[:16]]
    stop, errors, done = threading.Event(), [], [0]

    def load() -> None:
        with Client(served.server.grpc_url) as c:
            while not stop.is_set():
                try:
                    assert len(c.search(queries[done[0] % 16: done[0] % 16 + 4], k=5)[0]) == 5
                    done[0] += 1
                except Exception as exc:  # record, never hide, a lost request
                    errors.append(exc)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        before = done[0]
        report = build_index(served.onnx, str(tmp_path / "new"), served.index, progress=False)
        assert report.added == 10
        target = (new_dir / "3.png").read_bytes()
        deadline = time.monotonic() + 20
        with Client(served.server.grpc_url) as c:
            while c.search([target], k=1)[0][0].metadata.get("path") != "flipped/3.png":
                assert time.monotonic() < deadline, "the server never picked up the new index version"
                time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert errors == []
    assert done[0] > before > 0


def test_server_python_api_refuses_busy_port(served: Served, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(served.server.repository, repo, symlinks=True)
    busy = TritonServer(repo, grpc_port=served.server.ports["grpc"], http_port=free_port(), metrics_port=free_port())
    with pytest.raises(RuntimeError, match="grpc port.*already in use"):
        busy.start()
    assert busy.process is None
