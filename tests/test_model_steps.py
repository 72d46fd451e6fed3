"""The steps of the Triton Python models, in-process on a real FAISS index: batched results equal
per-request ones, and whatever breaks fails only the requests it belongs to."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ascl.images import ImageError
from ascl.serving.collections.faiss_index import GalleryIndex
from ascl.serving.collections.index import NewIndex, writing
from ascl.serving.online.model_steps import (
    IndexVersion,
    LiveIndex,
    Query,
    embed_batches,
    one_k,
    one_where,
    request_images,
    search_batches,
)
from ascl.serving.online.request_errors import RequestError

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def index() -> GalleryIndex:
    built = GalleryIndex.create(DIM, "Flat")
    built.add(unit(np.random.default_rng(0), 40), [{"path": f"{i}.png", "label": str(i % 4)} for i in range(40)])
    return built


class Counting:
    """A VectorIndex that counts ``records`` calls and fails searches of a poisoned (NaN) query."""

    def __init__(self, index: GalleryIndex) -> None:
        self.index, self.record_calls = index, 0

    def search(self, queries: np.ndarray, k: int, where: Any = None) -> tuple[np.ndarray, np.ndarray]:
        if np.isnan(queries).any():
            raise RuntimeError("the engine broke")
        return self.index.search(queries, k, where=where)

    def records(self, ids: Any = None) -> dict[int, dict[str, Any]]:
        self.record_calls += 1
        return self.index.records(ids)


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_request_images_checks_each_request() -> None:
    pixels = request_images(np.array([[png(1)], [png(2)]], dtype=np.object_), 8, max_image_bytes=2**20,
                            max_request_bytes=2**20)
    assert pixels.shape == (2, 8, 8, 3) and pixels.dtype == np.uint8
    with pytest.raises(RequestError, match="no image"):
        request_images(np.zeros((0, 1), dtype=np.object_), 8, max_image_bytes=2**20, max_request_bytes=2**20)
    with pytest.raises(RequestError, match="over the"):
        request_images(np.array([[png(1)]] * 3, dtype=np.object_), 8, max_image_bytes=2**20,
                       max_request_bytes=2 * len(png(1)))
    with pytest.raises(ImageError, match="image 1: not a readable image"):
        request_images(np.array([[png(1)], [b"junk"]], dtype=np.object_), 8, max_image_bytes=2**20,
                       max_request_bytes=2**20)


def test_one_k_and_one_where_per_request() -> None:
    assert one_k(np.array([[5], [5]], dtype=np.int32)) == 5
    with pytest.raises(RequestError, match="same k"):
        one_k(np.array([[5], [6]], dtype=np.int32))
    assert one_where(None) is None
    assert one_where(np.array([[b'{"label": "1"}']] * 2, dtype=np.object_)) == '{"label": "1"}'
    with pytest.raises(RequestError, match="same filter"):
        one_where(np.array([[b"{}"], [b'{"label": "1"}']], dtype=np.object_))


def test_embed_batches_one_call_and_the_breaking_request_fails_alone() -> None:
    calls: list[int] = []

    def embed(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        if (images == 255).all(axis=(1, 2, 3)).any():  # a white image breaks the engine
            raise RuntimeError("the engine broke")
        return images.reshape(len(images), -1)[:, :4].astype(np.float32)  # [B, 4]

    batches = [np.full((n, 2, 2, 3), v, np.uint8) for n, v in ((1, 1), (3, 2), (2, 3))]
    outcomes = embed_batches(embed, batches)
    assert calls == [6] and [o.shape for o in outcomes] == [(1, 4), (3, 4), (2, 4)]
    assert [float(o[0, 0]) for o in outcomes] == [1.0, 2.0, 3.0]
    calls.clear()
    outcomes = embed_batches(embed, [batches[0], np.full((1, 2, 2, 3), 255, np.uint8), batches[2]])
    assert calls == [4, 1, 1, 2]  # the batch, then one call per request
    assert isinstance(outcomes[1], RuntimeError) and outcomes[0].shape == (1, 4) and outcomes[2].shape == (2, 4)
    assert embed_batches(embed, []) == []


def test_search_batches_equal_one_search_per_request(index: GalleryIndex) -> None:
    rng = np.random.default_rng(1)
    queries = [Query(unit(rng, 1), 5), Query(unit(rng, 3), 5), Query(unit(rng, 2), 7),
               Query(unit(rng, 1), 5, '{"label": "2"}'), Query(unit(rng, 2), 100), Query(unit(rng, 1), 3, "")]
    counting = Counting(index)
    found = search_batches(IndexVersion(counting), queries)  # type: ignore[arg-type]
    for query, got in zip(queries, found, strict=True):
        scores, ids = index.search(query.embeddings, query.k, where=query.where or None)
        np.testing.assert_array_equal(got.ids, ids)
        np.testing.assert_allclose(got.scores, scores, atol=1e-6)
        assert got.metadata.shape == ids.shape
        assert [[m.decode() for m in row] for row in got.metadata] == [
            [json.dumps(index.metadata[int(i)], sort_keys=True) for i in row] for row in ids]
    assert {m.decode() for m in found[3].metadata.reshape(-1)} <= {
        json.dumps(index.metadata[i], sort_keys=True) for i in range(2, 40, 4)}
    assert found[4].ids.shape == (2, 40)  # k clamped to the index


def test_search_batches_fail_only_what_is_wrong(index: GalleryIndex) -> None:
    rng = np.random.default_rng(2)
    poisoned = np.full((1, DIM), np.nan, np.float32)
    queries = [Query(unit(rng, 1), 5), Query(unit(rng, 1), 0), Query(unit(rng, 1), 0),
               Query(unit(rng, 1), 5, '{"colour": "red"}'), Query(poisoned, 5), Query(unit(rng, 2), 5)]
    found = search_batches(IndexVersion(Counting(index)), queries)  # type: ignore[arg-type]
    assert isinstance(found[1], ValueError) and isinstance(found[2], ValueError) and "k must be >= 1" in str(found[1])
    assert isinstance(found[3], ValueError) and "colour" in str(found[3])
    assert isinstance(found[4], RuntimeError)  # broke its group's search: retried alone, it fails alone
    for i in (0, 5):  # its group-mates are answered
        np.testing.assert_array_equal(found[i].ids, index.search(queries[i].embeddings, 5)[1])


def test_metadata_is_encoded_once_per_index_version(index: GalleryIndex) -> None:
    counting = Counting(index)
    version = IndexVersion(counting)  # type: ignore[arg-type]
    query = [Query(unit(np.random.default_rng(3), 1), 5)]
    first = search_batches(version, query)[0]
    second = search_batches(version, query)[0]
    assert counting.record_calls == 1 and list(first.metadata[0]) == list(second.metadata[0])
    search_batches(IndexVersion(counting), query)  # type: ignore[arg-type]
    assert counting.record_calls == 2  # a new version reads its records again
    assert IndexVersion(index).metadata_json(np.array([[-1, 0]]))[0, 0] == b"{}"


def test_live_index_takes_each_new_version(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    folder = tmp_path / "idx"
    with writing(folder, who="test", create=NewIndex(dim=DIM, model={})) as new:
        new.add(unit(rng, 5), [{"path": f"{i}.png"} for i in range(5)])
    logs: list[str] = []
    live = LiveIndex(folder, poll_s=0.05, log_info=logs.append, log_warn=logs.append)
    try:
        first = live.current
        assert first.index.count() == 5
        with writing(folder, who="test") as more:
            more.add(unit(rng, 3), [{"path": f"new{i}.png"} for i in range(3)])
        deadline = time.monotonic() + 10
        while live.current is first:
            assert time.monotonic() < deadline, "the new version was never taken"
            time.sleep(0.05)
        assert live.current.index.count() == 8 and any("loaded index version" in line for line in logs)
    finally:
        live.close()


class Flaky:
    """An index backend whose server can be down (``ConnectionError``, as a remote backend's
    unavailable error is), serving an in-memory FAISS index when up."""

    def __init__(self, index: GalleryIndex) -> None:
        self.index, self.up, self.searches = index, False, 0

    def open(self, spec: Any) -> Any:
        if not self.up:
            raise ConnectionError("index server at flaky://here cannot be reached")
        backend = self

        class Remote:
            def __getattr__(self, name: str) -> Any:
                return getattr(backend.index, name)

            def refreshed(self) -> Any:
                if not backend.up:
                    raise ConnectionError("index server at flaky://here cannot be reached")
                return self

            def search(self, queries: np.ndarray, k: int, where: Any = None) -> Any:
                backend.searches += 1
                if not backend.up:
                    raise ConnectionError("index server at flaky://here cannot be reached")
                return backend.index.search(queries, k, where=where)

        return Remote()


def test_an_unreachable_index_fails_searches_until_it_is_back(index: GalleryIndex,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from ascl.serving.collections import index as interface

    flaky = Flaky(index)
    monkeypatch.setitem(interface.BACKENDS, "flaky", flaky)  # type: ignore[arg-type]
    logs: list[str] = []
    live = LiveIndex("flaky://here", poll_s=0.05, log_info=logs.append, log_warn=logs.append)
    try:
        with pytest.raises(ConnectionError, match="cannot be reached"):
            live.searchable()  # down at start: each batch is told so, no work done
        time.sleep(0.3)
        assert sum("UNAVAILABLE until it is back" in line for line in logs) == 1  # once per outage
        flaky.up = True
        deadline = time.monotonic() + 10
        while live.current is None:
            assert time.monotonic() < deadline, "the index was never opened once it was back"
            time.sleep(0.05)
        query = [Query(unit(np.random.default_rng(5), 1), 3), Query(unit(np.random.default_rng(6), 2), 3)]
        assert all(not isinstance(o, Exception) for o in search_batches(live.searchable(), query))
        assert "the index is reachable again" in logs
        flaky.up, before = False, flaky.searches  # gone mid-way: the group fails with it, no retry per query
        outcomes = search_batches(live.searchable(), query)
        assert all(isinstance(o, ConnectionError) for o in outcomes) and flaky.searches == before + 1
    finally:
        live.close()
