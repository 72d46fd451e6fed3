"""The contract of the index interface (``ascl.serving.collections.index``): what every backend must do.

Each test runs once per backend through the interface only (``writing``, ``open_index``,
``read_info``, ``index_exists``), so a new backend is admitted by adding its spec maker to
``SPECS``. FAISS (an index folder), Milvus (a collection of the real standalone server that the
session fixture ``milvus_server`` starts) and Milvus Lite (a local file) pass here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from milvus_helpers import collection_name, drop

from ascl.errors import AsclError
from ascl.export.identity import ModelMismatchError
from ascl.serving.collections.filters import MAX_FILTER_BYTES, FilterError
from ascl.serving.collections.index import (
    IndexFileError,
    IndexSpec,
    NewIndex,
    index_exists,
    open_index,
    read_info,
    writing,
)

DIM = 16
MODEL = {"name": "model-a", "weights": "sha256:" + "a" * 64, "dim": DIM, "precision": "fp32"}
OTHER = {"name": "model-b", "weights": "sha256:" + "b" * 64, "dim": DIM, "precision": "fp32"}
LABELS = ("cat", "dog", "bird")

# backend -> a function making the spec of a new, empty index (under a temporary folder, or a new collection)
SPECS: dict[str, Callable[[pytest.FixtureRequest, Path], IndexSpec]] = {
    "faiss": lambda request, tmp: tmp / "idx",
    "milvus": lambda request, tmp: request.getfixturevalue("milvus_server").spec(collection_name()),
    "milvus+lite": lambda request, tmp: f"milvus+lite://{tmp / 'lite.db'}#{collection_name()}",
}


@pytest.fixture(params=sorted(SPECS))
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IndexSpec]:
    if request.param.startswith("milvus"):
        pytest.importorskip("pymilvus", reason="the Milvus client is an extra: pip install 'ascl-hub[milvus]'")
    made = SPECS[request.param](request, tmp_path)
    yield made
    if request.param.startswith("milvus"):
        drop(str(made))


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # [n, DIM]


def records(n: int, start: int = 0) -> list[dict[str, object]]:
    return [{"path": f"{i}.png", "label": LABELS[i % 3], "size": i, "sha1": f"{i:040x}"}
            for i in range(start, start + n)]


def create(spec: IndexSpec, vectors: np.ndarray, recs: list[dict[str, object]]) -> np.ndarray:
    """A new index holding ``vectors``; returns their ids."""
    with writing(spec, who="the contract test", create=NewIndex(DIM, MODEL, size_hint=len(vectors)),
                 model=MODEL) as index:
        return index.add(vectors, recs)


def test_an_empty_index(spec: IndexSpec) -> None:
    assert not index_exists(spec)
    with writing(spec, who="the contract test", create=NewIndex(DIM, MODEL)) as index:
        assert index.count() == 0
    assert index_exists(spec) and index.version == 1
    info = read_info(spec)
    assert (info["count"], info["dim"], info["version"]) == (0, DIM, 1) and info["model"]["weights"] == MODEL["weights"]
    opened = open_index(spec)
    assert opened.count() == 0 and opened.dim == DIM and opened.records() == {} and opened.known_keys() == set()
    scores, ids = opened.search(unit(3), 5)
    assert scores.shape == ids.shape == (3, 0) and scores.dtype == np.float32 and ids.dtype == np.int64
    assert opened.search(unit(2), 5, where={"label": "cat"})[1].shape == (2, 0)
    assert opened.hits(unit(2), 5) == [[], []]
    vectors, held = opened.reconstruct()
    assert vectors.shape == (0, DIM) and held.shape == (0,)


def test_a_missing_index_is_an_error_that_leaves_nothing(spec: IndexSpec) -> None:
    with pytest.raises(IndexFileError, match="ascl index build"):
        open_index(spec)
    with pytest.raises(IndexFileError), writing(spec, who="the contract test") as index:
        index.add(unit(1), records(1))
    assert not index_exists(spec)
    with pytest.raises(IndexFileError):
        read_info(spec)


def test_add_search_ids_and_metadata(spec: IndexSpec) -> None:
    vectors, recs = unit(30), records(30)
    ids = create(spec, vectors, recs)
    assert ids.dtype == np.int64 and ids.shape == (30,) and len(set(ids.tolist())) == 30
    index = open_index(spec)
    assert index.count() == 30 and index.version == 1 and index.model["weights"] == MODEL["weights"]
    scores, found = index.search(vectors, 3)
    assert scores.shape == found.shape == (30, 3)
    assert found[:, 0].tolist() == ids.tolist()  # each vector finds itself first ...
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)  # ... at cosine 1
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    held = index.records()
    assert set(held) == set(ids.tolist())
    for i, rec in zip(ids.tolist(), recs, strict=True):
        assert {k: held[i][k] for k in rec} == rec
    assert set(index.records([int(ids[0]), int(ids[5]), 10**9])) == {int(ids[0]), int(ids[5])}
    hits = index.hits(vectors[:2], 2)
    assert [h.id for h in hits[0]][0] == ids[0] and hits[0][0].label == recs[0]["label"]
    assert hits[0][0].name == "0.png" and hits[1][0].metadata["path"] == "1.png"
    assert index.known_keys() == {str(r["sha1"]) for r in recs}


def test_k_larger_than_the_count_is_clamped_and_k_below_one_is_an_error(spec: IndexSpec) -> None:
    vectors = unit(7)
    ids = create(spec, vectors, records(7))
    index = open_index(spec)
    scores, found = index.search(vectors[:2], 100)
    assert found.shape == (2, 7) and set(found[0].tolist()) == set(ids.tolist())
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(vectors[:1], 0)
    with pytest.raises(ValueError):
        index.search(unit(1)[:, :DIM - 1], 1)  # the wrong dimension


def test_one_id_per_content(spec: IndexSpec) -> None:
    vectors, recs = unit(5), records(5)
    ids = create(spec, vectors, recs)
    with writing(spec, who="the contract test", model=MODEL) as index:
        again = index.add(unit(4, seed=1), [recs[2], *records(2, start=100), records(1, start=100)[0]])
        no_key = index.add(unit(2, seed=2), [{"path": "x.png"}, {"path": "x.png"}])
    assert again[0] == ids[2]  # bytes held already: the id they have, nothing added
    assert again[1] not in ids and again[3] == again[1]  # the same new bytes twice in one call: one id
    assert no_key[0] != no_key[1]  # records without a content key are always added
    assert open_index(spec).count() == 5 + 2 + 2


def test_remove_and_ids_are_never_reused(spec: IndexSpec) -> None:
    vectors = unit(10)
    ids = create(spec, vectors, records(10)).tolist()
    with writing(spec, who="the contract test") as index:
        assert index.remove([ids[1], ids[3], 10**9]) == 2
    index = open_index(spec)
    assert index.count() == 8 and ids[1] not in index.records() and index.version == 2
    _, found = index.search(vectors[[1, 3]], 8)
    assert ids[1] not in found and ids[3] not in found
    with writing(spec, who="the contract test") as writer:
        more = writer.add(unit(2, seed=3), records(2, start=50)).tolist()
    assert min(more) > max(ids)
    with writing(spec, who="the contract test") as writer:
        assert writer.remove([10**9]) == 0
    assert writer.version == 3  # nothing removed: no new version


def test_filters(spec: IndexSpec) -> None:
    vectors, recs = unit(60), records(60)
    ids = create(spec, vectors, recs)
    index = open_index(spec)
    label_of = {int(i): r["label"] for i, r in zip(ids, recs, strict=True)}
    size_of = {int(i): r["size"] for i, r in zip(ids, recs, strict=True)}
    _, found = index.search(vectors, 5, where={"label": "cat"})
    assert found.shape == (60, 5) and {label_of[int(i)] for i in found.ravel()} == {"cat"}
    _, found = index.search(vectors[:3], 50, where={"label": ["cat", "dog"]})
    assert found.shape == (3, 40) and {label_of[int(i)] for i in found.ravel()} == {"cat", "dog"}
    _, found = index.search(vectors[:2], 5, where={"label": "dog", "size": 4})  # numbers compare as text
    assert found.tolist() == [[ids[4]], [ids[4]]] and size_of[int(ids[4])] == 4
    assert index.search(vectors[:2], 5, where='{"label": "cat"}')[1].shape == (2, 5)  # JSON text as well
    assert index.search(vectors[:2], 5, where={"label": "fish"})[1].shape == (2, 0)
    assert index.hits(vectors[:1], 3, where={"label": "bird"})[0][0].label == "bird"
    with pytest.raises(FilterError, match="unknown filter field 'colour'; this index knows: ") as info:
        index.search(vectors[:1], 3, where={"colour": "red"})
    assert isinstance(info.value, AsclError) and isinstance(info.value, ValueError)
    with pytest.raises(FilterError, match="unknown filter field"):
        index.check_where({"colour": "red"})
    index.check_where({"label": "cat"})
    index.check_where(None)
    with pytest.raises(FilterError, match=f"over the {MAX_FILTER_BYTES // 1024} KiB limit"):
        index.search(vectors[:1], 3, where='{"label": "' + "x" * MAX_FILTER_BYTES + '"}')


def test_versions_and_a_failed_change_writes_nothing(spec: IndexSpec) -> None:
    create(spec, unit(4), records(4))
    old = open_index(spec)
    assert old.version == 1 and old.refreshed() is old
    with writing(spec, who="the contract test") as index:
        pass
    assert index.version == 1  # nothing changed: no new version
    with pytest.raises(RuntimeError, match="in the middle"), writing(spec, who="the contract test") as index:
        index.add(unit(2, seed=5), records(2, start=10))
        raise RuntimeError("a failure in the middle of a change")
    assert read_info(spec)["version"] == 1 and open_index(spec).count() == 4
    with writing(spec, who="the contract test") as index:
        index.add(unit(1, seed=6), records(1, start=20))
    assert index.version == 2 == read_info(spec)["version"]
    fresh = old.refreshed()
    assert fresh is not old and fresh.version == 2 and fresh.count() == 5 and old.count() == 4


def test_writers_take_turns(spec: IndexSpec) -> None:
    create(spec, unit(2), records(2))
    holding, release, heard = threading.Event(), threading.Event(), []

    def first() -> None:
        with writing(spec, who="the first writer") as index:
            holding.set()
            release.wait(30)
            index.add(unit(1, seed=7), records(1, start=30))

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(30)

    def waiting(text: str) -> None:
        heard.append(text)
        release.set()

    with writing(spec, who="the second writer", on_wait=waiting) as index:
        assert index.count() == 3  # it saw the first writer's change
        index.add(unit(1, seed=8), records(1, start=40))
    thread.join()
    assert heard and "the first writer" in heard[0]
    assert open_index(spec).count() == 4 and read_info(spec)["version"] == 3


def test_embeddings_of_another_model_are_refused(spec: IndexSpec) -> None:
    create(spec, unit(3), records(3))
    with pytest.raises(ModelMismatchError, match="model-a") as info, \
            writing(spec, who="the contract test", model=OTHER) as index:
        index.add(unit(1), records(1, start=9))
    assert "model-b" in str(info.value) and info.value.exit_code == 2
    assert open_index(spec).count() == 3 and read_info(spec)["version"] == 1
    with writing(spec, who="the contract test", model=dict(MODEL, precision="int8")) as index:  # same weights
        index.add(unit(1, seed=4), records(1, start=9))
    assert open_index(spec).model["weights"] == MODEL["weights"]


def test_reconstruct_gives_the_vectors_back_by_id(spec: IndexSpec) -> None:
    vectors = unit(25)
    ids = create(spec, vectors, records(25))
    with writing(spec, who="the contract test") as index:
        index.remove([int(ids[0])])
    stored, held = open_index(spec).reconstruct()
    assert stored.shape == (24, DIM) and sorted(held.tolist()) == sorted(ids[1:].tolist())
    by_id = dict(zip(ids.tolist(), vectors, strict=True))
    cosine = np.einsum("nd,nd->n", stored, np.stack([by_id[int(i)] for i in held]))
    assert (cosine > 0.99).all()
