"""Triton Python model `search`: embeddings + k (+ where) -> ids, scores, metadata (JSON) from an index.

A k larger than the index is clamped to its size (an index can shrink under a running
client); a k below 1 is that request's INVALID_ARGUMENT error. The optional ``where`` input is a
metadata filter as JSON text (``{"label": "cat"}``, ``ascl.serving.collections.filters``), the
same in every row of a request; an absent or empty one filters nothing. A bad filter (malformed,
over 16 KiB, an unknown field) is that request's INVALID_ARGUMENT error; one that matches nothing
returns no hits.

The index (``ascl.serving.collections.index``: a folder, or a URI of another backend) is a
``model_steps.LiveIndex``: opened in ``initialize``, each new version (``ascl index add``)
swapped in by a watcher thread. ``execute`` takes one reference to the current index per batch
(``model_steps.search_batches``), so in-flight requests finish on the version they started with.
An index whose server cannot be reached (a ``ConnectionError``) fails each request with it until
it can (one that is down at start is opened by the watcher once it is up). Metadata leaves without
server paths (``public_metadata``: a gallery's name instead of its folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from ascl.names import EMBEDDINGS, TOP_K, WHERE
from ascl.serving.online.model_steps import (
    LiveIndex,
    Query,
    found_response,
    model_index_spec,
    one_k,
    one_where,
    search_batches,
)
from ascl.serving.online.request_errors import error_response


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = json.loads(args["model_config"])["parameters"]
        folder = Path(args["model_repository"]) / args["model_version"]
        poll_s = float(params.get("poll_seconds", {}).get("string_value", "0.5"))
        self.index = LiveIndex(model_index_spec(params["index_dir"]["string_value"], folder), poll_s=poll_s,
                               log_info=lambda text: pb_utils.Logger.log_info(f"search: {text}"),
                               log_warn=lambda text: pb_utils.Logger.log_warn(f"search: {text}"))

    def _query(self, request: Any) -> Query:
        embeddings = pb_utils.get_input_tensor_by_name(request, EMBEDDINGS).as_numpy()  # [B, D]
        k = one_k(pb_utils.get_input_tensor_by_name(request, TOP_K).as_numpy())
        where = pb_utils.get_input_tensor_by_name(request, WHERE)
        return Query(embeddings, k, one_where(None if where is None else where.as_numpy()))

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            version = self.index.searchable()
        except ConnectionError as exc:  # the index's server has not been reachable yet: UNAVAILABLE, each
            return [error_response(pb_utils, "search", exc) for _ in requests]
        responses: list[Any] = [None] * len(requests)
        queries: list[tuple[int, Query]] = []
        for i, request in enumerate(requests):
            try:
                queries.append((i, self._query(request)))
            except Exception as exc:  # this request alone fails; the rest of the batch is answered
                responses[i] = error_response(pb_utils, "search", exc)
        outcomes = search_batches(version, [q for _, q in queries])
        for (i, _), outcome in zip(queries, outcomes, strict=True):
            responses[i] = (error_response(pb_utils, "search", outcome) if isinstance(outcome, Exception)
                            else found_response(pb_utils, outcome))
        return responses

    def finalize(self) -> None:
        self.index.close()
