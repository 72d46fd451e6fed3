"""The Milvus backend against FAISS on the same data, against a real Milvus standalone server.

- FLAT in Milvus and Flat in FAISS over the same 5,000 embeddings: the same top-10 for every
  query, scores within 1e-5, with and without filters.
- Filters whose values and field names hold quotes, brackets, backslashes and unicode select the
  same entries in both (they are data, never expression syntax).
- HNSW (sealed and indexed by Milvus): recall@10 against exact search at least 0.95.
- An unreachable server is a clear error within seconds, from the library and from the command.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import free_port
from milvus_helpers import collection_name, drop

pytest.importorskip("pymilvus", reason="the Milvus client is an extra: pip install 'ascl-hub[milvus]'")

from ascl.serving.collections import milvus_index  # noqa: E402
from ascl.serving.collections.filters import parse_where  # noqa: E402
from ascl.serving.collections.index import (  # noqa: E402
    IndexUnavailableError,
    NewIndex,
    open_index,
    writing,
)

DIM = 64
MODEL = {"name": "model-a", "weights": "sha256:" + "a" * 64, "dim": DIM, "precision": "fp32"}
# values a filter must treat as data: quotes, brackets, backslashes, unicode, expression syntax
SPECIAL = ['say "cheese"', "it's", "[1, 2]", "back\\slash", "trailing\\", "ünïcödé 🐱 猫", "a) or (id >= 0",
           '"] or true or ["', "new\nline", "{}", ""]
LABELS = ["cat", "dog", "bird", *SPECIAL]


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # [n, DIM]


def records(n: int) -> list[dict[str, Any]]:
    return [{"path": f"img/{i}.png", "label": LABELS[i % len(LABELS)], "size": i % 7, "sha1": f"{i:040x}",
             'we"ird [key]': SPECIAL[i % len(SPECIAL)]} for i in range(n)]


@pytest.fixture(scope="module")
def pair(milvus_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, np.ndarray]]:
    """The same 5,000 embeddings and records in a Milvus FLAT collection and a FAISS Flat folder."""
    vectors, recs = unit(5000, seed=0), records(5000)
    spec = milvus_server.spec(collection_name("flat"))
    folder = tmp_path_factory.mktemp("faiss") / "idx"
    for where, factory in ((spec, "FLAT"), (folder, "Flat")):
        with writing(where, who="the test", create=NewIndex(DIM, MODEL, factory, len(vectors)), model=MODEL) as index:
            ids = index.add(vectors, recs)
        assert ids.tolist() == list(range(5000))
    yield spec, folder, vectors
    drop(spec)


def assert_same_hits(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    """Same shape, the same ids in the same order, scores within 1e-5 (both score in float32; an order
    swap would need two scores closer than their rounding, about 1e-7)."""
    (scores, ids), (want_scores, want_ids) = got, want
    assert ids.shape == want_ids.shape and scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_flat_milvus_equals_flat_faiss(pair: tuple[str, Path, np.ndarray]) -> None:
    spec, folder, _ = pair
    milvus, faiss = open_index(spec), open_index(folder)
    assert milvus.info()["factory"] == "FLAT" and faiss.info()["factory"] == "Flat"
    assert milvus.count() == faiss.count() == 5000
    queries = unit(300, seed=1)
    assert_same_hits(milvus.search(queries, 10), faiss.search(queries, 10))
    for where in ({"label": "cat"}, {"label": ["dog", "bird"], "size": 2}, {"size": [0, 6]},
                  {"label": SPECIAL[:4]}, {"id": [5, 77, 4999]}):
        got, want = milvus.search(queries[:60], 10, where), faiss.search(queries[:60], 10, where)
        assert got[1].shape[1] == min(10, want[1].shape[1]) and got[1].shape[1] > 0
        assert_same_hits(got, want)
    for got_row, want_row in zip(milvus.hits(queries[:3], 5), faiss.hits(queries[:3], 5), strict=True):
        assert [(h.id, dict(h.metadata)) for h in got_row] == [(h.id, dict(h.metadata)) for h in want_row]


def test_special_values_are_data_in_filters(pair: tuple[str, Path, np.ndarray]) -> None:
    spec, folder, vectors = pair
    milvus, faiss = open_index(spec), open_index(folder)
    for value in SPECIAL:
        for where in ({"label": value}, {'we"ird [key]': value}, {"label": [value, "cat"]}):
            expression = milvus_index.filter_expression(parse_where(where))
            got, want = milvus.search(vectors[:5], 500, where), faiss.search(vectors[:5], 500, where)
            assert got[1].shape == want[1].shape and want[1].shape[1] > 0, (where, expression)
            assert [set(r) for r in got[1].tolist()] == [set(r) for r in want[1].tolist()], (where, expression)
            held = milvus.records(got[1][0].tolist())
            assert {held[i]["label"] for i in got[1][0].tolist()} <= {value, "cat"} or "we" in next(iter(where))
    assert milvus.search(vectors[:1], 5, {"label": 'nothing" or "1" == "1'})[1].shape == (1, 0)


def test_expressions_quote_every_name_and_value() -> None:
    expression = milvus_index.filter_expression(parse_where({'a"b': ['x"] or true or ["', "back\\"], "c": 1}))
    assert expression == ('(fields["a\\"b"] == "back\\\\" or fields["a\\"b"] == "x\\"] or true or [\\"") '
                          'and fields["c"] == "1"')


def test_hnsw_recall_against_exact(milvus_server: Any) -> None:
    vectors, queries = unit(5000, seed=3), unit(200, seed=4)
    spec = milvus_server.spec(collection_name("hnsw"))
    try:
        with writing(spec, who="the test", create=NewIndex(DIM, MODEL, "HNSW32", len(vectors)), model=MODEL) as index:
            index.add(vectors, records(5000))
        sealed = milvus_index.seal(spec, timeout_s=180)  # HNSW is built on sealed segments only
        assert sealed == 5000
        index = open_index(spec)
        assert index.info()["index_type"] == "HNSW"
        _, found = index.search(queries, 10)
        exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]  # [Q, 10]
        recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found.tolist(), exact.tolist(), strict=True)])
        assert recall >= 0.95, recall
        _, narrow = index.search(queries[:20], 10, where={"label": "say \"cheese\""})  # 1 in 14: still 10 hits
        assert narrow.shape == (20, 10)
    finally:
        drop(spec)


def test_an_unreachable_server_is_a_clear_error_within_seconds(tmp_path: Path) -> None:
    spec = f"milvus://127.0.0.1:{free_port()}/gallery"
    began = time.monotonic()
    with pytest.raises(IndexUnavailableError, match="is unreachable.*start it, or check the address") as info:
        open_index(spec)
    assert time.monotonic() - began < 10 and info.value.exit_code == 1
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ascl", "index", "info", "--index", spec], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "is unreachable" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - began < 60  # mostly the interpreter's imports on a busy machine
