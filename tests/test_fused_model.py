"""The fused hot path (`image_search` and `embed` as one Python model each) answers exactly what the
chain of separate models (`preprocess` -> `encoder` -> `search`) answers, on the real ``tritonserver``.

One server for the module, `image_search`'s batcher holding requests for a second
(``repository.dynamic_batching``) so that requests sent together land in one dynamic batch even
on a busy machine; Triton's own statistics (private port, admin key) show that they did. The
chain is called model by model on the same server (its batchers hold nothing).
"""

from __future__ import annotations

import io
import json
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import free_port
from google.protobuf import text_format
from PIL import Image
from serving_helpers import export_random_encoder, processes_mentioning, wait_until
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from ascl import names
from ascl.images import list_images
from ascl.serving import TritonServer
from ascl.serving.collections.build import build_index
from ascl.serving.online.repository import Batching, dynamic_batching, write_config, write_repository
from ascl.serving.online.server import ADMIN_KEY_HEADER

pytestmark = pytest.mark.triton

HOLD_US = 1_000_000  # long enough that requests sent together meet in one batch on a busy 2-core machine


@dataclass
class Served:
    server: TritonServer
    gallery: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, digits_folder: Path) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("fused")
    onnx_path = export_random_encoder(root / "encoder.onnx")
    build_index(onnx_path, str(digits_folder), root / "idx", progress=False)
    repo = write_repository(root / "models", onnx_path, root / "idx")
    fused_config = repo / names.MODEL_IMAGE_SEARCH / "config.pbtxt"
    config = text_format.Parse(fused_config.read_text(), model_config_pb2.ModelConfig())
    dynamic_batching(config, Batching(queue_delay_us=HOLD_US))
    write_config(fused_config.parent, config)
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    try:
        server.start()
        yield Served(server, digits_folder)
    finally:
        server.stop()
    assert processes_mentioning(str(repo)) == []


# ---------------------------------------------------------------- requests

def tensor(name: str, values: np.ndarray, dtype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(values.shape), dtype)
    inp.set_data_from_numpy(values)
    return inp


def image_input(images: list[bytes]) -> grpcclient.InferInput:
    return tensor(names.IMAGE_BYTES, np.array([[b] for b in images], dtype=np.object_).reshape(len(images), 1), "BYTES")


def search_inputs(images: list[bytes], k: int, where: str | None = None) -> list[grpcclient.InferInput]:
    rows = max(1, len(images))
    inputs = [tensor(names.TOP_K, np.full((rows, 1), k, dtype=np.int32), "INT32")]
    if where is not None:
        inputs.append(tensor(names.WHERE, np.full((rows, 1), where.encode(), dtype=np.object_), "BYTES"))
    return inputs


@dataclass(frozen=True)
class Ask:
    """One image search: its images, k and filter."""

    images: list[bytes]
    k: int = 5
    where: str | None = None


Answer = tuple[np.ndarray, np.ndarray, list[list[dict[str, Any]]]] | InferenceServerException
SEARCH_OUT = [names.IDS, names.SCORES, names.METADATA]


def _unpack(result: grpcclient.InferResult) -> Answer:
    ids, scores, meta = (result.as_numpy(n) for n in SEARCH_OUT)  # [B, k'] each
    return ids, scores, [[json.loads(m) for m in row] for row in meta]


def fused(served: Served, asks: list[Ask]) -> list[Answer]:
    """All ``asks`` sent to `image_search` at once (async), so that they meet in one dynamic batch."""
    answers: list[Answer | None] = [None] * len(asks)
    done = threading.Semaphore(0)
    inputs = [[image_input(ask.images), *search_inputs(ask.images, ask.k, ask.where)] for ask in asks]  # first
    outputs = [grpcclient.InferRequestedOutput(n) for n in SEARCH_OUT]
    with grpcclient.InferenceServerClient(served.server.grpc_url) as client:
        for i, request in enumerate(inputs):
            def callback(result: Any, error: Any, i: int = i) -> None:
                answers[i] = error if error is not None else _unpack(result)
                done.release()

            client.async_infer(names.MODEL_IMAGE_SEARCH, request, callback, outputs=outputs)
        for _ in asks:
            assert done.acquire(timeout=120), "a request never answered"
    return [a for a in answers if a is not None]


def chain(served: Served, ask: Ask) -> Answer:
    """The same search, model by model: preprocess, encoder, search (the first error ends it)."""
    with grpcclient.InferenceServerClient(served.server.grpc_url) as client:
        try:
            pixels = client.infer(names.MODEL_PREPROCESS, [image_input(ask.images)]).as_numpy(names.IMAGES)
            embeddings = client.infer(names.MODEL_ENCODER, [tensor(names.IMAGES, pixels, "UINT8")]).as_numpy(
                names.EMBEDDINGS)
            inputs = [tensor(names.EMBEDDINGS, embeddings, "FP32"), *search_inputs(ask.images, ask.k, ask.where)]
            return _unpack(client.infer(names.MODEL_SEARCH, inputs))
        except InferenceServerException as exc:
            return exc


def assert_same(fused_answer: Answer, chain_answer: Answer) -> None:
    """Same ids in the same order (ties within 1e-5 may swap), scores within 1e-5, same metadata."""
    assert not isinstance(fused_answer, Exception), fused_answer
    assert not isinstance(chain_answer, Exception), chain_answer
    (f_ids, f_scores, f_meta), (c_ids, c_scores, c_meta) = fused_answer, chain_answer
    assert f_ids.shape == c_ids.shape and f_ids.dtype == np.int64 and f_scores.dtype == np.float32
    np.testing.assert_allclose(f_scores, c_scores, atol=1e-5)
    for f_row, c_row, scores in zip(f_ids, c_ids, c_scores, strict=True):
        for j in range(len(f_row)):
            if f_row[j] != c_row[j]:  # only a tie may order two hits differently
                ties = np.abs(scores - scores[j]) <= 1e-5
                assert set(f_row[ties]) == set(c_row[ties]), (f_row, c_row, scores)
    by_id = {int(i): m for ids, meta in ((c_ids, c_meta),) for r_i, r_m in zip(ids, meta, strict=True)
             for i, m in zip(r_i, r_m, strict=True)}
    for r_i, r_m in zip(f_ids, f_meta, strict=True):
        assert [by_id[int(i)] for i in r_i] == list(r_m)


def assert_same_error(fused_answer: Answer, chain_answer: Answer, message: str) -> None:
    """Both fail as the client's fault, with the same reason (the model name in front may differ)."""
    for answer in (fused_answer, chain_answer):
        assert isinstance(answer, InferenceServerException), answer
        assert answer.status() == "StatusCode.INVALID_ARGUMENT" and message in str(answer.message()), answer
    reason = str(fused_answer.message()).split(": ", 1)[1]
    assert reason == str(chain_answer.message()).split(": ", 1)[1]


def admin_get(served: Served, path: str) -> dict[str, Any]:
    """A restricted Triton API (statistics, config) over HTTP with the admin key."""
    request = urllib.request.Request(f"{served.server.http_url}{path}",
                                     headers={ADMIN_KEY_HEADER: served.server.admin_key})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return dict(json.loads(resp.read()))


def batch_sizes(served: Served, model: str) -> dict[int, int]:
    """Executions per batch size (images) of ``model`` so far, from Triton's statistics."""
    (stats,) = admin_get(served, f"/v2/models/{model}/stats")["model_stats"]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def grew(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {b: n - before.get(b, 0) for b, n in after.items() if n > before.get(b, 0)}


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def gallery_bytes(served: Served, n: int, start: int = 0) -> list[bytes]:
    return [p.read_bytes() for p in list_images(served.gallery)[start:start + n]]


# ---------------------------------------------------------------- tests

def test_one_image_requests_match_the_chain(served: Served) -> None:
    images = gallery_bytes(served, 4, start=30)
    for image in images:  # sent one at a time: batches of one
        (answer,) = fused(served, [Ask([image], k=7)])
        assert_same(answer, chain(served, Ask([image], k=7)))
        assert answer[2][0][0]["path"] == list_images(served.gallery)[30 + images.index(image)].relative_to(
            served.gallery).as_posix()  # itself first


def test_a_dynamic_batch_matches_the_chain_request_by_request(served: Served) -> None:
    images = gallery_bytes(served, 12, start=5)
    asks = [Ask(images[i:i + 1], k=5) for i in range(6)] + [Ask(images[6:9], k=3), Ask(images[9:12], k=8),
                                                            Ask(images[:2], k=100_000)]  # clamped to the index
    before = batch_sizes(served, names.MODEL_IMAGE_SEARCH)
    answers = fused(served, asks)
    # Triton counts an execution just after its responses leave: wait for the count, not for a time
    wait_until(lambda: grew(before, batch_sizes(served, names.MODEL_IMAGE_SEARCH)), 10, "the batch statistics")
    formed = grew(before, batch_sizes(served, names.MODEL_IMAGE_SEARCH))
    assert max(formed) > 3, f"the requests never met in one batch: {formed}"  # several requests per execution
    for ask, answer in zip(asks, answers, strict=True):
        assert_same(answer, chain(served, ask))
    assert answers[-1][0].shape == (2, 120)


def test_filters_match_the_chain(served: Served) -> None:
    images = gallery_bytes(served, 6, start=40)
    asks = [Ask(images[:2], k=4, where='{"label": "3"}'), Ask(images[2:3], k=6, where='{"label": ["1", "7"]}'),
            Ask(images[3:4], k=4, where='{"label": "3"}'), Ask(images[4:5], k=4),
            Ask(images[5:6], k=4, where='{"label": "no such label"}')]
    answers = fused(served, asks)
    for ask, answer in zip(asks, answers, strict=True):
        assert_same(answer, chain(served, ask))
    assert {m["label"] for row in answers[0][2] for m in row} == {"3"}
    assert {m["label"] for row in answers[1][2] for m in row} <= {"1", "7"}
    assert answers[4][0].shape == (1, 0)  # a filter that matches nothing: no hits, no error


def test_embed_matches_preprocess_then_encoder(served: Served) -> None:
    images = gallery_bytes(served, 10, start=60)
    with grpcclient.InferenceServerClient(served.server.grpc_url) as client:
        pixels = client.infer(names.MODEL_PREPROCESS, [image_input(images)]).as_numpy(names.IMAGES)
        expected = client.infer(names.MODEL_ENCODER, [tensor(names.IMAGES, pixels, "UINT8")]).as_numpy(names.EMBEDDINGS)
        got = client.infer(names.MODEL_EMBED, [image_input(images)]).as_numpy(names.EMBEDDINGS)
    assert got.shape == expected.shape == (10, 128) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


BAD = [  # (name, the request, what its error says)
    ("corrupt", Ask([b"\x89PNG\r\n\x1a\n" + b"garbage" * 50]), "not a readable image"),
    ("empty image", Ask([b""]), "empty input"),
    ("tall png", Ask([png((1, 1_000_000), mode="L")]), "aspect ratio"),
    ("good and truncated", None, "image 1: not a readable image"),
    ("k = 0", None, "k must be >= 1"),
    ("unknown filter field", None, "unknown filter field"),
    ("malformed filter", None, "a filter must be a JSON object"),
]


def test_bad_requests_in_a_batch_fail_alone_with_the_chains_errors(served: Served) -> None:
    good = gallery_bytes(served, 6, start=80)
    bad = []
    for name, ask, message in BAD:
        if name == "good and truncated":
            ask = Ask([good[0], good[1][: len(good[1]) // 3]])
        elif name == "k = 0":
            ask = Ask([good[2]], k=0)
        elif name == "unknown filter field":
            ask = Ask([good[3]], where='{"colour": "red"}')
        elif name == "malformed filter":
            ask = Ask([good[4]], where="{not json")
        assert ask is not None
        bad.append((name, ask, message))
    goods = [Ask([image], k=4) for image in good]
    asks = [ask for pair in zip_longest(goods, [b[1] for b in bad]) for ask in pair if ask is not None]
    before = batch_sizes(served, names.MODEL_IMAGE_SEARCH)
    answers = dict(zip(map(id, asks), fused(served, asks), strict=True))
    wait_until(lambda: grew(before, batch_sizes(served, names.MODEL_IMAGE_SEARCH)), 10, "the batch statistics")
    formed = grew(before, batch_sizes(served, names.MODEL_IMAGE_SEARCH))
    assert max(formed) >= 4, f"good and bad requests never met in one batch: {formed}"
    for ask in goods:  # every good request answered as the chain answers it
        assert_same(answers[id(ask)], chain(served, ask))
    for name, ask, message in bad:
        assert_same_error(answers[id(ask)], chain(served, ask), message)
        assert "0x" not in str(answers[id(ask)]) and "/tmp" not in str(answers[id(ask)]), name


def test_the_fused_models_keep_the_public_contract(served: Served) -> None:
    """Same names, tensors, dtypes, dims and batch limit as the ensembles of the production repository."""
    search = admin_get(served, f"/v2/models/{names.MODEL_IMAGE_SEARCH}/config")
    embed = admin_get(served, f"/v2/models/{names.MODEL_EMBED}/config")
    assert (search["backend"], embed["backend"]) == ("python", "python")
    assert [(t["name"], t["data_type"], t["dims"], t.get("optional", False)) for t in search["input"]] == [
        (names.IMAGE_BYTES, "TYPE_STRING", [1], False), (names.TOP_K, "TYPE_INT32", [1], False),
        (names.WHERE, "TYPE_STRING", [1], True)]
    assert [(t["name"], t["data_type"], t["dims"]) for t in search["output"]] == [
        (names.IDS, "TYPE_INT64", [-1]), (names.SCORES, "TYPE_FP32", [-1]), (names.METADATA, "TYPE_STRING", [-1])]
    assert [(t["name"], t["data_type"], t["dims"]) for t in embed["output"]] == [(names.EMBEDDINGS, "TYPE_FP32", [128])]  # width 16: 128-d
    assert search["max_batch_size"] == embed["max_batch_size"] == 64
    assert search["dynamic_batching"]["max_queue_delay_microseconds"] == HOLD_US
