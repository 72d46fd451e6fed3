"""Filtered search (``where={"label": "cat"}``): inside FAISS, k results at any selectivity, end to end.

The index tests compare every factory that ``auto`` picks (Flat, HNSW32, IVF + fast-scan PQ with
SQ8 re-ranking) with a brute-force reference computed in numpy from the same vectors: the exact
index (Flat) must return the reference itself (recall 1.0), the approximate ones most of it. The
end-to-end tests use the session's ``ascl serve`` service (front door + the real ``tritonserver``)
over the small digits gallery (``digits_service`` in conftest.py).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import DigitsService
from tritonclient.utils import InferenceServerException

from ascl import names
from ascl.cli import main
from ascl.errors import USAGE, AsclError
from ascl.serving import Client
from ascl.serving.collections import faiss_filters
from ascl.serving.collections.faiss_index import GalleryIndex
from ascl.serving.collections.filters import MAX_FILTER_BYTES, FilterError, parse_where, where_json
from ascl.serving.online.request_checks import grpc_infer_problem, http_infer_problem
from ascl.serving.online.serve_cli import parse_where_args

N, DIM, Q = 4000, 64, 12
FACTORIES = ["Flat", "HNSW32", "IVF128,PQ32x4fs,Refine(SQ8)"]  # what `auto` picks, at test size


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@dataclass
class Collection:
    vectors: np.ndarray  # [N, D] unit
    queries: np.ndarray  # [Q, D] unit
    records: list[dict[str, object]]

    def ids_where(self, **fields: object) -> np.ndarray:
        """Ids (= positions: the first add starts at id 0) whose records match every field (list: any of)."""
        def ok(record: dict[str, object]) -> bool:
            return all(str(record.get(f)) in ([str(v) for v in want] if isinstance(want, list) else [str(want)])
                       for f, want in fields.items())
        return np.array([i for i, r in enumerate(self.records) if ok(r)], dtype=np.int64)

    def reference(self, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force in numpy: (scores [Q, k'], ids [Q, k']) among ``allowed``."""
        scores = self.queries @ self.vectors[allowed].T  # [Q, M]
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), allowed[order]


@pytest.fixture(scope="module")
def collection() -> Collection:
    rng = np.random.default_rng(7)
    centres = unit(rng.standard_normal((40, DIM)))  # clustered, like real embeddings
    vectors = unit(centres[rng.integers(0, 40, N)] + 0.35 * rng.standard_normal((N, DIM)))
    labels = np.full(N, "common", dtype=object)
    labels[rng.choice(N, N // 100, replace=False)] = "rare"  # 1% of the collection
    broad = rng.choice(np.flatnonzero(labels == "common"), int(0.4 * N), replace=False)
    labels[broad] = "broad"  # 40%: the approximate paths
    records = [{"path": f"{i}.png", "label": str(labels[i]), "colour": ("red", "blue")[i % 2], "size": i % 7}
               for i in range(N)]
    queries = unit(vectors[rng.choice(N, Q, replace=False)] + 0.2 * rng.standard_normal((Q, DIM)))
    return Collection(vectors, queries, records)


@pytest.fixture(scope="module", params=FACTORIES)
def index(request: pytest.FixtureRequest, collection: Collection, tmp_path_factory: pytest.TempPathFactory
          ) -> GalleryIndex:
    """A saved and loaded index (the query-time knobs a server uses) of the collection."""
    folder = tmp_path_factory.mktemp("filtered") / "idx"
    built = GalleryIndex.create(DIM, request.param)
    assert built.add(collection.vectors, collection.records).tolist() == list(range(N))
    built.save(folder)
    return GalleryIndex.load(folder)


def exact_factory(index: GalleryIndex) -> bool:
    """True when the stored vectors are exact (every factory but IVF, which scores with SQ8 codes)."""
    return not str(index.manifest["factory"]).startswith("IVF")


def exact_search(index: GalleryIndex) -> bool:
    """True for the exhaustive index (Flat): any search of it must return the brute-force answer."""
    return str(index.manifest["factory"]) == "Flat"


def min_recall(index: GalleryIndex, approximate: float) -> float:
    """1.0 for the exhaustive index, ``approximate`` for the graph and inverted-list ones."""
    return 1.0 if exact_search(index) else approximate


def assert_like_reference(index: GalleryIndex, collection: Collection, allowed: np.ndarray, k: int,
                          scores: np.ndarray, ids: np.ndarray, min_recall: float = 1.0) -> None:
    want_scores, want_ids = collection.reference(allowed, k)
    assert ids.shape == scores.shape == (Q, min(k, len(allowed)))  # every row full
    assert np.isin(ids, allowed).all()  # only matching entries
    assert all(len(set(row)) == len(row) for row in ids.tolist())
    recall = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), want_ids.tolist(), strict=True)])
    assert recall >= min_recall, recall
    exact_scores = np.einsum("qd,qkd->qk", collection.queries, collection.vectors[ids])
    tolerance = 1e-5 if exact_factory(index) else 2e-2
    np.testing.assert_allclose(scores, exact_scores, atol=tolerance)  # the scores are those ids' similarities
    if min_recall == 1.0:  # exact: the reference's ids and scores
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=tolerance)


# ---------------------------------------------------------------------------- the index, in process


def test_one_percent_selectivity_gives_k_results_like_brute_force(index: GalleryIndex, collection: Collection) -> None:
    rare = collection.ids_where(label="rare")
    assert len(rare) == N // 100
    scores, ids = index.search(collection.queries, 10, where={"label": "rare"})
    assert_like_reference(index, collection, rare, 10, scores, ids, 1.0 if exact_factory(index) else 0.95)


def test_k_beyond_the_matches_returns_every_match(index: GalleryIndex, collection: Collection) -> None:
    rare = collection.ids_where(label="rare")
    scores, ids = index.search(collection.queries, 100, where={"label": "rare"})
    assert ids.shape == (Q, len(rare)) and all(set(row) == set(rare.tolist()) for row in ids.tolist())
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_broad_filter_through_the_approximate_index(index: GalleryIndex, collection: Collection) -> None:
    broad = collection.ids_where(label="broad")
    scores, ids = index.search(collection.queries, 10, where={"label": "broad"})
    assert_like_reference(index, collection, broad, 10, scores, ids, min_recall(index, 0.9))


def test_rows_are_full_even_when_the_approximate_search_falls_short(
        index: GalleryIndex, collection: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    # No exact path by selectivity: HNSW and IVF search a 1% filter with the selector and a wider
    # beam, and rows that come back short are searched again exhaustively.
    monkeypatch.setattr(faiss_filters, "EXACT_MATCHES", 0)
    monkeypatch.setattr(faiss_filters, "EXACT_FRACTION", 0.0)
    monkeypatch.setattr(faiss_filters, "HNSW_FILTER_EF_MAX", 16)  # a beam too narrow for a 1% filter
    ivf = faiss.try_extract_index_ivf(faiss.downcast_index(index.index.index))
    if ivf is not None:
        monkeypatch.setattr(ivf, "nprobe", 1)  # scaled by 1 / selectivity: 100 of the 128 lists
    rare = collection.ids_where(label="rare")
    scores, ids = index.search(collection.queries, 10, where={"label": "rare"})
    assert ids.shape == (Q, 10) and np.isin(ids, rare).all()
    assert_like_reference(index, collection, rare, 10, scores, ids, min_recall(index, 0.8))


def test_and_of_fields_and_lists_of_values(index: GalleryIndex, collection: Collection) -> None:
    both = collection.ids_where(label="broad", colour="red")
    scores, ids = index.search(collection.queries, 10, where={"label": "broad", "colour": "red"})
    assert_like_reference(index, collection, both, 10, scores, ids, min_recall(index, 0.9))
    either = collection.ids_where(label=["rare", "common"], size=3)
    assert 0 < len(either) < N // 5
    scores, ids = index.search(collection.queries, 10, where={"label": ["rare", "common"], "size": 3})
    assert_like_reference(index, collection, either, 10, scores, ids, 1.0 if exact_factory(index) else 0.95)
    # numbers compare as their text: 3 and "3" are one filter
    np.testing.assert_array_equal(index.search(collection.queries, 5, where={"size": "3"})[1],
                                  index.search(collection.queries, 5, where={"size": 3})[1])


def test_no_match_is_empty_and_unknown_fields_are_errors(index: GalleryIndex, collection: Collection) -> None:
    for where in ({"label": "nothing-has-this"}, {"label": []}, {"label": "rare", "colour": "green"}):
        scores, ids = index.search(collection.queries, 10, where=where)
        assert scores.shape == ids.shape == (Q, 0)
    assert index.hits(collection.queries[:2], 5, where={"label": "nothing-has-this"}) == [[], []]
    with pytest.raises(FilterError, match="unknown filter field 'colour_'; this index knows: colour, id, label, "
                                          "path, size") as info:
        index.search(collection.queries, 10, where={"colour_": "red"})
    assert isinstance(info.value, AsclError) and isinstance(info.value, ValueError)
    assert info.value.exit_code == USAGE
    hits = index.hits(collection.queries[:1], 3, where={"label": "rare"})[0]
    assert len(hits) == 3 and {h.metadata["label"] for h in hits} == {"rare"}
    plain = index.search(collection.queries, 10)  # no filter, an empty one: the same search
    np.testing.assert_array_equal(index.search(collection.queries, 10, where={})[1], plain[1])


def test_the_lookup_is_built_once_per_version(collection: Collection) -> None:
    index = GalleryIndex.create(DIM, "Flat")
    index.add(collection.vectors[:100], collection.records[:100])
    fields = index.field_index()
    index.search(collection.queries, 5, where={"label": "common"})
    assert index.field_index() is fields and fields.field("label") is fields.field("label")
    index.add(collection.vectors[100:101], [{"label": "new"}])
    assert index.field_index() is not fields
    assert index.search(collection.queries, 5, where={"label": "new"})[1].tolist() == [[100]] * Q
    index.remove([100])
    assert index.search(collection.queries, 5, where={"label": "new"})[1].shape == (Q, 0)


def test_filter_grammar() -> None:
    assert parse_where(None) == parse_where("") == parse_where("{}") == parse_where({}) == {}
    assert parse_where({"label": ["b", "a", "a"], "size": 3, "ok": True}) == {
        "label": ("a", "b"), "size": ("3",), "ok": ("true",)}
    assert parse_where(b'{"label": "cat"}') == {"label": ("cat",)}
    assert where_json({"label": "cat", "colour": ["red", "blue"]}) == '{"colour":["blue","red"],"label":"cat"}'
    for bad, message in (("[1]", "object"), ("{nope", "JSON object"), ({"label": {"x": 1}}, "values must be"),
                         ({"": "x"}, "non-empty"), ({"label": None}, "values must be"),
                         ({"label": "x" * MAX_FILTER_BYTES}, "16 KiB"), ('{"a": "' + "x" * MAX_FILTER_BYTES, "16 KiB")):
        with pytest.raises(FilterError, match=message):
            where_json(bad)  # type: ignore[arg-type]
    assert parse_where_args(["label=cat", "label=dog", "colour=red", "note=a=b", "empty="]) == {
        "label": ["cat", "dog"], "colour": "red", "note": "a=b", "empty": ""}
    with pytest.raises(AsclError, match="FIELD=VALUE"):
        parse_where_args(["label"])


def _grpc_request(where: list[bytes]) -> bytes:
    from tritonclient.grpc._utils import _get_inference_request

    inp = grpcclient.InferInput(names.WHERE, [len(where), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[w] for w in where], dtype=np.object_))
    k = grpcclient.InferInput(names.TOP_K, [len(where), 1], "INT32")
    k.set_data_from_numpy(np.ones((len(where), 1), np.int32))
    return bytes(_get_inference_request(names.MODEL_IMAGE_SEARCH, [k, inp], "", "", None, 0, False, False, 0,
                                        None, None).SerializeToString())


def _http_request(where: list[bytes], binary: bool) -> tuple[bytes, str | None]:
    k = httpclient.InferInput(names.TOP_K, [len(where), 1], "INT32")
    k.set_data_from_numpy(np.ones((len(where), 1), np.int32), binary_data=binary)
    inp = httpclient.InferInput(names.WHERE, [len(where), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[w] for w in where], dtype=np.object_), binary_data=binary)
    body, header_length = httpclient.InferenceServerClient.generate_request_body([k, inp])
    return body, None if header_length is None else str(header_length)


def test_front_door_bounds_the_filter_and_forwards_the_rest() -> None:
    ok = where_json({"label": "x" * (MAX_FILTER_BYTES - 20)}).encode()
    big = json.dumps({"label": "x" * MAX_FILTER_BYTES}).encode()
    assert grpc_infer_problem(_grpc_request([ok, ok])) is None
    assert "over the 16 KiB limit" in str(grpc_infer_problem(_grpc_request([ok, big])))
    assert "at most 1024 filters" in str(grpc_infer_problem(_grpc_request([b"{}"] * 1025)))
    for binary in (True, False):
        assert http_infer_problem(*_http_request([ok], binary)) is None
        assert "over the 16 KiB limit" in str(http_infer_problem(*_http_request([ok, big], binary)))


# ---------------------------------------------------------------------------- end to end: ascl serve's service


@dataclass
class Served:
    url: str  # gRPC, the front door
    http_url: str
    onnx: Path
    index: Path
    gallery: Path


@pytest.fixture(scope="module")
def served(digits_service: DigitsService) -> Served:
    """The session's ``ascl serve`` service over the 120 digits (conftest.py); these tests only read."""
    service = digits_service.service
    return Served(service.grpc_url, service.http_url, digits_service.onnx, digits_service.index,
                  digits_service.gallery)


def image(served: Served, digit: int, i: int = 0) -> bytes:
    return (served.gallery / str(digit) / f"{i:04d}.png").read_bytes()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_where_returns_only_matching_labels(served: Served, protocol: str) -> None:
    from ascl.serving.online.gallery import InProcessGallery

    url = served.url if protocol == "grpc" else served.http_url
    queries = [image(served, 3), image(served, 8, 2)]
    local = InProcessGallery(served.onnx, served.index)
    with Client(url, protocol=protocol) as client:
        for where, labels in (({"label": "7"}, {"7"}), ({"label": ["1", "4"]}, {"1", "4"})):
            results = client.search(queries, k=5, where=where)
            assert [len(hits) for hits in results] == [5, 5]
            assert {h.metadata["label"] for hits in results for h in hits} <= labels
            assert [[h.id for h in hits] for hits in results] == [[r.id for r in rs] for rs in
                                                                   local.search(queries, 5, where=where)]
        every_seven = client.search(queries[:1], k=50, where={"label": "7"})[0]
        assert len(every_seven) == 12 and {h.metadata["label"] for h in every_seven} == {"7"}  # all 12, no more
        assert client.search(queries, k=5, where={"label": "no-such-label"}) == [[], []]
        assert client.search(queries[:1], k=3, where={"label": "3", "path": "3/0000.png"})[0][0].metadata[
            "path"] == "3/0000.png"
        with pytest.raises(InferenceServerException, match="unknown filter field 'colour'; this index knows: "
                                                           "id, label, path") as err:
            client.search(queries, k=5, where={"colour": "red"})
        assert "400" in str(err.value) if protocol == "http" else err.value.status() == "StatusCode.INVALID_ARGUMENT"
        plain = client.search(queries, k=5)  # no filter: what an older client sends
        assert plain[0][0].metadata["path"] == "3/0000.png" and len({h.metadata["label"] for h in plain[1]}) >= 1


def test_a_client_that_sends_no_filter_still_works(served: Served) -> None:
    inputs = [grpcclient.InferInput(names.IMAGE_BYTES, [1, 1], "BYTES"), grpcclient.InferInput(names.TOP_K, [1, 1],
                                                                                             "INT32")]
    inputs[0].set_data_from_numpy(np.array([[image(served, 5)]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[4]], dtype=np.int32))
    with grpcclient.InferenceServerClient(served.url) as raw:  # the inputs of the ensemble before `where`
        out = raw.infer(names.MODEL_IMAGE_SEARCH, inputs)
        assert out.as_numpy(names.IDS).shape == (1, 4)
        assert json.loads(out.as_numpy(names.METADATA)[0][0])["path"] == "5/0000.png"
        metadata = raw.get_model_metadata(names.MODEL_IMAGE_SEARCH, as_json=True)
    assert names.WHERE in {i["name"] for i in metadata["inputs"]}


def test_a_bad_filter_fails_only_its_request(served: Served) -> None:
    wheres: list[dict[str, object] | str] = [{"label": "2"}, {"nope": "x"}, {"label": "6"}, "not json", {"label": "9"},
                                            {"label": "2"}] * 3
    outcomes: dict[int, object] = {}

    def ask(i: int) -> None:
        where = wheres[i]
        inputs = [grpcclient.InferInput(n, [1, 1], t) for n, t in
                  ((names.IMAGE_BYTES, "BYTES"), (names.TOP_K, "INT32"), (names.WHERE, "BYTES"))]
        inputs[0].set_data_from_numpy(np.array([[image(served, i % 10)]], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.array([[3]], dtype=np.int32))
        text = where if isinstance(where, str) else json.dumps(where)
        inputs[2].set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
        try:
            with grpcclient.InferenceServerClient(served.url) as raw:
                out = raw.infer(names.MODEL_IMAGE_SEARCH, inputs)
            outcomes[i] = {json.loads(m)["label"] for m in out.as_numpy(names.METADATA)[0]}
        except InferenceServerException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(wheres))]
    for t in threads:  # at once: requests with bad filters share dynamic batches with good ones
        t.start()
    for t in threads:
        t.join()
    for i, where in enumerate(wheres):
        if isinstance(where, dict) and "label" in where:
            assert outcomes[i] == {where["label"]}, (where, outcomes[i])
        else:
            assert isinstance(outcomes[i], InferenceServerException), outcomes[i]
            assert outcomes[i].status() == "StatusCode.INVALID_ARGUMENT"  # type: ignore[union-attr]
            assert "unknown filter field 'nope'" in str(outcomes[i]) or "JSON object" in str(outcomes[i])


def test_rows_of_one_request_share_one_filter(served: Served) -> None:
    inputs = [grpcclient.InferInput(n, [2, 1], t) for n, t in
              ((names.IMAGE_BYTES, "BYTES"), (names.TOP_K, "INT32"), (names.WHERE, "BYTES"))]
    inputs[0].set_data_from_numpy(np.array([[image(served, 1)], [image(served, 2)]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[3], [3]], dtype=np.int32))
    inputs[2].set_data_from_numpy(np.array([[b'{"label":"1"}'], [b'{"label":"2"}']], dtype=np.object_))
    with grpcclient.InferenceServerClient(served.url) as raw, pytest.raises(InferenceServerException,
                                                                             match="the same filter") as err:
        raw.infer(names.MODEL_IMAGE_SEARCH, inputs)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_front_door_refuses_a_filter_over_16_kib(served: Served) -> None:
    big = json.dumps({"label": "x" * MAX_FILTER_BYTES})
    for protocol, url in (("grpc", served.url), ("http", served.http_url)):
        client = Client(url, protocol=protocol)
        with pytest.raises(FilterError, match="16 KiB"):  # the client refuses it before sending
            client.search([image(served, 0)], k=3, where={"label": "x" * MAX_FILTER_BYTES})
        module = grpcclient if protocol == "grpc" else httpclient
        inputs = [module.InferInput(n, [1, 1], t) for n, t in
                  ((names.IMAGE_BYTES, "BYTES"), (names.TOP_K, "INT32"), (names.WHERE, "BYTES"))]
        inputs[0].set_data_from_numpy(np.array([[image(served, 0)]], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.array([[3]], dtype=np.int32))
        inputs[2].set_data_from_numpy(np.array([[big.encode()]], dtype=np.object_))
        with module.InferenceServerClient(url.removeprefix("http://")) as raw, pytest.raises(
                InferenceServerException) as err:
            raw.infer(names.MODEL_IMAGE_SEARCH, inputs)
        assert "over the 16 KiB limit" in str(err.value)
        assert ("400" in str(err.value) or err.value.status() == "400") if protocol == "http" else (
            err.value.status() == "StatusCode.INVALID_ARGUMENT")
        # just under the limit it goes through the door (and matches nothing)
        near = where_json({"label": "x" * (MAX_FILTER_BYTES - 20)})
        assert client.search([image(served, 0)], k=3, where=json.loads(near)) == [[]]
        assert client.search([image(served, 0)], k=3, where={"label": "0"})[0][0].metadata["label"] == "0"
        client.close()


def test_query_cli_where(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    query = str(served.gallery / "4" / "0001.png")
    assert main(["query", query, "-k", "4", "--server", served.url, "--where", "label=9", "--where", "label=6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == query and len(lines) == 5
    assert all(" label 9 " in line or " label 6 " in line for line in lines[1:]), lines
    assert main(["query", query, "--server", served.url, "--where", "shape=round"]) == USAGE
    err = capsys.readouterr().err
    assert "unknown filter field 'shape'" in err and "label" in err
    assert main(["query", query, "--server", served.url, "--where", "label"]) == USAGE
    assert "FIELD=VALUE" in capsys.readouterr().err


def test_gallery_services_filter_alike(served: Served) -> None:
    from ascl.serving.online.gallery import InProcessGallery, TritonGallery

    remote, local = TritonGallery(served.url, served.index), InProcessGallery(served.onnx, served.index)
    assert remote.labels() == local.labels() == [str(d) for d in range(10)]
    queries = [image(served, 0), image(served, 5, 3)]
    for service in (remote, local):
        found = service.search(queries, 6, where={"label": "8"})
        assert [len(r) for r in found] == [6, 6] and {r.label for rs in found for r in rs} == {"8"}
        one = service.search(queries[0], 4, where={"label": ["0", "5"]})
        assert len(one) == 4 and {r.label for r in one} <= {"0", "5"}
        assert service.search(queries[0], 4, where={"label": "none"}) == []
    assert [r.id for r in remote.search(queries[1], 6, where={"label": "8"})] == [
        r.id for r in local.search(queries[1], 6, where={"label": "8"})]
    with pytest.raises(FilterError, match="this index knows"):
        local.search(queries[0], 4, where={"colour": "red"})
