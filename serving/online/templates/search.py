"""Triton Python model `search`: embeddings + k (+ where) -> ids, scores, metadata (JSON) from an index.

A k larger than the index is clamped to its size (an index can shrink under a running
client); a k below 1 is that request's INVALID_ARGUMENT error. The optional ``where`` input is a
metadata filter as JSON text (``{"label": "cat"}``, ``ascl.serving.collections.filters``), the
same in every row of a request; an absent or empty one filters nothing. A bad filter (malformed,
over 16 KiB, an unknown field) is that request's INVALID_ARGUMENT error; one that matches nothing
returns no hits.

The index (``ascl.serving.collections.index``: a folder, or a URI of another backend such as a
Milvus collection) is opened in ``initialize``; a watcher thread takes each new version (``ascl
index add``), builds its lookups for filters, and swaps it in. ``execute`` takes one reference to
the current index per batch, so in-flight requests finish on the version they started with.
An index whose server cannot be reached (``IndexUnavailableError``) answers UNAVAILABLE, request
by request, until it can (a server that is down at start is opened by the watcher once it is up).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ascl.names import EMBEDDINGS, IDS, METADATA, SCORES, TOP_K, WHERE
from ascl.serving.collections.index import IndexUnavailableError, VectorIndex, open_index
from ascl.serving.online.request_errors import RequestError, error_response


def _where(request: Any) -> str | None:
    """The request's filter (JSON text), None when it sent none; RequestError when its rows disagree."""
    tensor = pb_utils.get_input_tensor_by_name(request, WHERE)
    if tensor is None:
        return None
    rows = [v if isinstance(v, bytes) else str(v).encode() for v in tensor.as_numpy().reshape(-1)]  # [B]
    if len(set(rows)) > 1:
        raise RequestError("all rows of one request need the same filter (where)")
    return rows[0].decode("utf-8", errors="replace") if rows else None  # parsed (and its size checked) by the index


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import faiss

        faiss.omp_set_num_threads(1)  # small query batches: OpenMP spin-waits only steal CPU from the encoder
        params = json.loads(args["model_config"])["parameters"]
        folder = Path(args["model_repository"]) / args["model_version"]
        spec = params["index_dir"]["string_value"]
        self.spec = spec if "://" in spec else folder / spec  # a folder: absolute paths win in the join
        self.poll_s = float(params.get("poll_seconds", {}).get("string_value", "0.5"))
        self.index: VectorIndex | None = None
        self._down: str | None = None  # why the index's server is unreachable, logged once per outage
        self._open()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="index-watcher", daemon=True)
        self._watcher.start()

    def _open(self) -> None:
        try:
            index = open_index(self.spec)
            index.warm()  # once per version, not per request
        except IndexUnavailableError as exc:
            self._unreachable(exc)
            return
        self.index = index

    def _unreachable(self, exc: Exception) -> None:
        if self._down is None:
            pb_utils.Logger.log_warn(f"search: {exc}; answering UNAVAILABLE until it is back")
        self._down = str(exc)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            current = self.index
            if current is None:
                self._open()
                continue
            try:
                fresh = current.refreshed()
                if self._down is not None:
                    pb_utils.Logger.log_info("search: the index is reachable again")
                    self._down = None
                if fresh is not current:
                    fresh.warm()
                    self.index = fresh  # one reference swap: readers see the old or the new index
                    pb_utils.Logger.log_info(f"search: loaded index version {fresh.version} ({fresh.count()} vectors)")
            except IndexUnavailableError as exc:
                self._unreachable(exc)
            except Exception as exc:  # a bad new version must not stop serving the current one
                pb_utils.Logger.log_warn(f"search: keeping index version {current.version}: {exc}")

    def _respond(self, index: VectorIndex, request: Any) -> Any:
        queries = pb_utils.get_input_tensor_by_name(request, EMBEDDINGS).as_numpy()  # [B, D]
        ks = pb_utils.get_input_tensor_by_name(request, TOP_K).as_numpy().reshape(-1)  # [B]
        if len(set(ks.tolist())) != 1:
            raise RequestError(f"all rows of one request need the same k, got {sorted(set(ks.tolist()))}")
        scores, ids = index.search(queries, int(ks[0]), where=_where(request))  # [B, k'] each, k' <= k
        records = index.records(ids.reshape(-1).tolist())
        meta = np.array(
            [[json.dumps(records.get(int(i), {}), sort_keys=True).encode() for i in row] for row in ids],
            dtype=np.object_,
        )  # [B, k]
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(IDS, ids), pb_utils.Tensor(SCORES, scores), pb_utils.Tensor(METADATA, meta)]
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        index = self.index
        responses = []
        for request in requests:
            try:
                if index is None:
                    raise IndexUnavailableError(self._down or "the index has not been opened yet")
                responses.append(self._respond(index, request))
            except Exception as exc:  # this request alone fails; the rest of the batch is answered
                responses.append(error_response(pb_utils, "search", exc))
        return responses

    def finalize(self) -> None:
        self._stop.set()
