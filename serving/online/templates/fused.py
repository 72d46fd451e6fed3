"""Triton Python models `image_search` and `embed` of the embedded repository: the hot path in one stub.

One model decodes the encoded images of a dynamic batch, embeds them with ONNX Runtime and, as
`image_search`, searches them through the index interface; the chain it replaces
(`preprocess` -> `encoder` -> `search`, still served for clients that want a step alone) paid a
Python-stub round trip per step. Parameter ``task``: ``search`` (`image_search`: image bytes, k,
optional where -> ids, scores, metadata) or ``embed`` (`embed`: image bytes -> embeddings).

It answers exactly what the chain answers, because it runs the same steps
(``ascl.serving.online.model_steps``) on the same ONNX file and index: each request is decoded
on its own (a bad request fails alone, with the same message), the good ones are embedded as one
batch (one call per request if that fails) and searched once per distinct (k, where). It reaches
the index only through the index interface (``LiveIndex``), so any backend serves it; one whose
server cannot be reached fails each request with that (a ``ConnectionError``) until it can.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ascl.export.runtime import OnnxEmbedder
from ascl.names import EMBEDDINGS, IMAGE_BYTES, TOP_K, WHERE
from ascl.serving.online.model_steps import (
    LiveIndex,
    Query,
    embed_batches,
    found_response,
    model_index_spec,
    one_k,
    one_where,
    request_images,
    search_batches,
    tiny_png,
)
from ascl.serving.online.request_errors import error_response


def _param(params: dict[str, Any], key: str, default: str | None = None) -> str:
    value = params.get(key, {}).get("string_value", default)
    if value is None:
        raise KeyError(f"model parameter {key!r} is missing")
    return str(value)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = config["parameters"]
        self.name = config["name"]
        folder = Path(args["model_repository"]) / args["model_version"]
        self.searching = _param(params, "task") == "search"
        # One intra-op thread per instance, no spin-waiting: the instances and Triton share the cores.
        self.embedder = OnnxEmbedder(folder / _param(params, "onnx_file"), threads=int(_param(params, "threads", "1")),
                                     spinning=False)
        self.size = self.embedder.image_size
        self.max_image_bytes = int(_param(params, "max_image_bytes"))
        self.max_request_bytes = int(_param(params, "max_request_bytes"))
        self.index: LiveIndex | None = None
        if self.searching:
            log = self.name + ": {}"
            self.index = LiveIndex(model_index_spec(_param(params, "index_dir"), folder),
                                   poll_s=float(_param(params, "poll_seconds", "0.5")),
                                   log_info=lambda text: pb_utils.Logger.log_info(log.format(text)),
                                   log_warn=lambda text: pb_utils.Logger.log_warn(log.format(text)))
        # warm-up, off the request path: the PIL codecs, ONNX Runtime's first run at batch 1 and 8
        pixels = request_images(np.array([tiny_png()], dtype=np.object_), self.size,
                                max_image_bytes=self.max_image_bytes, max_request_bytes=self.max_request_bytes)
        for batch in (1, 8):
            self.embedder.embed(np.repeat(pixels, batch, axis=0))

    def _read(self, request: Any) -> tuple[np.ndarray, int, str | None]:
        """(decoded images [B, S, S, 3], k, where) of one request: decoding first, as the chain does."""
        data = pb_utils.get_input_tensor_by_name(request, IMAGE_BYTES).as_numpy()  # [B, 1] bytes
        pixels = request_images(data, self.size, max_image_bytes=self.max_image_bytes,
                                max_request_bytes=self.max_request_bytes)
        if not self.searching:
            return pixels, 0, None
        k = one_k(pb_utils.get_input_tensor_by_name(request, TOP_K).as_numpy())
        where = pb_utils.get_input_tensor_by_name(request, WHERE)
        return pixels, k, one_where(None if where is None else where.as_numpy())

    def execute(self, requests: list[Any]) -> list[Any]:
        version = None
        if self.index is not None:
            try:
                version = self.index.searchable()
            except ConnectionError as exc:  # the index's server has not been reachable yet: no work, each fails
                return [error_response(pb_utils, self.name, exc) for _ in requests]
        responses: list[Any] = [None] * len(requests)
        good: list[tuple[int, tuple[np.ndarray, int, str | None]]] = []
        for i, request in enumerate(requests):
            try:
                good.append((i, self._read(request)))
            except Exception as exc:  # this request alone fails; the rest of the batch is answered
                responses[i] = error_response(pb_utils, self.name, exc)
        embedded: list[tuple[int, Query]] = []
        for (i, (_, k, where)), outcome in zip(good, embed_batches(self.embedder.embed, [g[0] for _, g in good]),
                                               strict=True):
            if isinstance(outcome, Exception):
                responses[i] = error_response(pb_utils, self.name, outcome)
            elif self.searching:
                embedded.append((i, Query(outcome, k, where)))
            else:
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(EMBEDDINGS, outcome)])
        if embedded and version is not None:
            outcomes = search_batches(version, [q for _, q in embedded])
            for (i, _), found in zip(embedded, outcomes, strict=True):
                responses[i] = (error_response(pb_utils, self.name, found) if isinstance(found, Exception)
                                else found_response(pb_utils, found))
        return responses

    def finalize(self) -> None:
        if self.index is not None:
            self.index.close()
