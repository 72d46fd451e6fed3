"""The real Triton server (CPU) serving a real index: parity, exact neighbours, bad input, live updates.

The read-only tests share the session's ``digits_service`` (conftest.py: front door, Triton,
supervisor over the 120 digits); the live-update test changes a served index, so it starts a
server of its own on a copy of the index. Every server is stopped and leaves no process behind.
"""

from __future__ import annotations

import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import DigitsService, free_port
from PIL import Image
from serving_helpers import processes_mentioning, wait_until
from tritonclient.utils import InferenceServerException

from ascl import names
from ascl.cli import main
from ascl.export.runtime import OnnxEmbedder
from ascl.images import list_images, load_image
from ascl.serving import Client, TritonServer
from ascl.serving.collections.build import build_index
from ascl.serving.collections.faiss_index import GalleryIndex
from ascl.serving.online.repository import write_repository

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def client(digits_service: DigitsService) -> Iterator[Client]:
    with Client(digits_service.service.grpc_url) as c:
        yield c


def raw_infer(url: str, model: str, inputs: list[grpcclient.InferInput]) -> grpcclient.InferResult:
    with grpcclient.InferenceServerClient(url) as c:
        return c.infer(model, inputs)


def bytes_input(*items: bytes) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(names.IMAGE_BYTES, [len(items), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b] for b in items], dtype=np.object_).reshape(len(items), 1))
    return inp


def test_health_and_metrics(digits_service: DigitsService) -> None:
    service = digits_service.service
    with urllib.request.urlopen(f"{service.http_url}/v2/health/ready", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(service.metrics_url, timeout=5) as resp:
        assert "nv_inference_request_success" in resp.read().decode()


def test_embeddings_equal_onnxruntime(digits_service: DigitsService, client: Client) -> None:
    files = list_images(digits_service.gallery)[:70]  # more than one request (64 per request)
    remote = client.embed(files)  # [70, 128]
    local = OnnxEmbedder(digits_service.onnx).embed(np.stack([load_image(f, 32) for f in files]))
    assert remote.shape == local.shape == (70, 128)
    np.testing.assert_allclose(remote, local, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(remote, axis=1), 1.0, atol=1e-5)


def test_search_returns_the_exact_neighbours(digits_service: DigitsService, client: Client) -> None:
    """A Flat index searched through the service returns what brute force over the same embeddings
    (ONNX Runtime here, numpy) returns: every hit's score is its true similarity, and the scores are
    the k best ones (recall 1.0; only exact ties could reorder ids)."""
    files = list_images(digits_service.gallery)
    k = 11
    results = client.search(files, k=k)
    vectors = OnnxEmbedder(digits_service.onnx).embed(np.stack([load_image(f, 32) for f in files]))  # [120, 128]
    row_of = {f.relative_to(digits_service.gallery).as_posix(): i for i, f in enumerate(files)}
    sims = vectors @ vectors.T  # [120, 120]
    best = -np.sort(-sims, axis=1)[:, :k]  # the k best similarities of each query
    got_scores = np.array([[h.score for h in hits] for hits in results])
    got_rows = np.array([[row_of[h.metadata["path"]] for h in hits] for hits in results])
    assert got_scores.shape == (len(files), k)
    np.testing.assert_allclose(got_scores, best, atol=1e-5)
    np.testing.assert_allclose(got_scores, np.take_along_axis(sims, got_rows, axis=1), atol=1e-5)
    assert (got_rows[:, 0] == np.arange(len(files))).all()  # every image finds itself first
    assert all(len(set(row)) == k for row in got_rows.tolist())
    assert all(h.metadata["label"] == files[row_of[h.metadata["path"]]].parent.name for hits in results for h in hits)


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
def test_bad_request_fails_alone(digits_service: DigitsService, client: Client, case: str, model: str,
                                 message: str) -> None:
    """Sent to Triton itself, behind the front door: the Python models check their input on their own."""
    good = (digits_service.gallery / "7" / "0000.png").read_bytes()
    with pytest.raises(InferenceServerException) as err:
        raw_infer(digits_service.triton_grpc_url, model, bad_inputs(case, good))
    assert message in str(err.value)
    # the client's fault, not INTERNAL; except a request of no image, which Triton's Python stub
    # itself fails while unpacking it (the service's front door refuses it first: test_serving_hardening)
    expected = "StatusCode.INTERNAL" if case == "empty request" else "StatusCode.INVALID_ARGUMENT"
    assert err.value.status() == expected, err.value
    assert "0x" not in str(err.value) and "/tmp" not in str(err.value)  # no addresses, no server paths
    hits = client.search([good], k=3)[0]  # the server keeps answering
    assert hits[0].metadata["path"] == "7/0000.png"


def test_k_larger_than_the_index_is_clamped(digits_service: DigitsService, client: Client) -> None:
    good = (digits_service.gallery / "7" / "0000.png").read_bytes()
    hits = client.search([good], k=100_000)[0]
    assert len(hits) == GalleryIndex.load(digits_service.index).ntotal == 120
    assert hits[0].metadata["path"] == "7/0000.png"


def test_query_cli_and_http_client(digits_service: DigitsService, capsys: pytest.CaptureFixture[str]) -> None:
    service = digits_service.service
    image = digits_service.gallery / "4" / "0003.png"
    assert main(["query", str(image), "-k", "3", "--server", service.grpc_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(image) and "1. id" in out[1] and "4/0003.png" in out[1] and len(out) == 4
    with Client(service.http_url, protocol="http") as http:
        assert http.search([image], k=2)[0][0].metadata["path"] == "4/0003.png"
    assert main(["query", str(image), "--server", f"127.0.0.1:{free_port()}"]) == 2


def test_server_python_api_refuses_busy_port(digits_service: DigitsService, tmp_path: Path) -> None:
    service = digits_service.service
    repo = tmp_path / "models"
    shutil.copytree(service.repository, repo, symlinks=True)
    busy = TritonServer(repo, grpc_port=service.ports["grpc"], http_port=free_port(), metrics_port=free_port())
    with pytest.raises(RuntimeError, match="grpc port.*already in use"):
        busy.start()
    assert busy.process is None


@pytest.fixture()
def own_server(digits_service: DigitsService, tmp_path: Path) -> Iterator[tuple[TritonServer, Path]]:
    """A server of its own on a copy of the digits index, for a test that changes the index."""
    shutil.copytree(digits_service.index, tmp_path / "idx")
    repo = write_repository(tmp_path / "models", digits_service.onnx, tmp_path / "idx")
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    try:
        server.start()
        yield server, tmp_path / "idx"
    finally:
        server.stop()
    assert processes_mentioning(str(repo)) == []


def test_index_update_under_load_loses_nothing(digits_service: DigitsService, own_server: tuple[TritonServer, Path],
                                               tmp_path: Path) -> None:
    server, index = own_server
    new_dir = tmp_path / "new" / "flipped"
    new_dir.mkdir(parents=True)
    for digit in range(10):  # new, unseen images: upside-down digits
        src = Image.open(digits_service.gallery / str(digit) / "0005.png")
        src.transpose(Image.Transpose.ROTATE_180).save(new_dir / f"{digit}.png")
    queries = [f.read_bytes() for f in list_images(digits_service.gallery)[:16]]
    stop, errors, done = threading.Event(), [], [0]

    def load() -> None:
        with Client(server.grpc_url) as c:
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
        wait_until(lambda: done[0] >= 4, 60, "searches under load")
        report = build_index(digits_service.onnx, str(tmp_path / "new"), index, progress=False)
        assert report.added == 10
        target = (new_dir / "3.png").read_bytes()
        with Client(server.grpc_url) as c:
            wait_until(lambda: c.search([target], k=1)[0][0].metadata.get("path") == "flipped/3.png", 30,
                       "the server picking up the new index version", every_s=0.2)
        picked_up = done[0]
        wait_until(lambda: done[0] >= picked_up + 8, 60, "searches on the new version")
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert errors == []
    with Client(server.grpc_url) as c:
        assert len(c.search([target], k=500)[0]) == 130
