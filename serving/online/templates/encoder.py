"""Triton Python model `encoder`: uint8 NHWC images -> unit-norm embeddings via ONNX Runtime.

The embedded (no Docker) stand-in for a native ``onnxruntime_onnx`` model: the same ONNX file,
run with the CUDA provider when a GPU is there. The session is created once in ``initialize``;
``execute`` checks each request and runs the good ones as one batch
(``model_steps.embed_batches``: one call per request if that batch fails), so one bad request
never fails another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ascl.export.runtime import OnnxEmbedder
from ascl.names import EMBEDDINGS, IMAGES
from ascl.serving.online.model_steps import embed_batches
from ascl.serving.online.request_errors import RequestError, error_response


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = json.loads(args["model_config"])["parameters"]
        folder = Path(args["model_repository"]) / args["model_version"]
        # No spin-waiting: several instances and the other models share few cores; spinning
        # threads would steal the CPU they need (measured ~1.5x throughput on 2 busy cores).
        self.embedder = OnnxEmbedder(
            folder / params["onnx_file"]["string_value"],
            threads=int(params.get("threads", {}).get("string_value", "1")),
            spinning=False,
        )
        self.shape = (self.embedder.image_size, self.embedder.image_size, 3)

    def _images(self, request: Any) -> np.ndarray:
        images = pb_utils.get_input_tensor_by_name(request, IMAGES).as_numpy()  # [B, S, S, 3]
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != self.shape or not len(images):
            raise RequestError(f"expected uint8 images [N>=1, {', '.join(map(str, self.shape))}], got "
                               f"{images.dtype} {list(images.shape)}")
        return images

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        good: list[tuple[int, np.ndarray]] = []
        for i, request in enumerate(requests):
            try:
                good.append((i, self._images(request)))
            except Exception as exc:
                responses[i] = error_response(pb_utils, "encoder", exc)
        for (i, _), outcome in zip(good, embed_batches(self.embedder.embed, [x for _, x in good]), strict=True):
            responses[i] = (error_response(pb_utils, "encoder", outcome) if isinstance(outcome, Exception)
                            else pb_utils.InferenceResponse([pb_utils.Tensor(EMBEDDINGS, outcome)]))
        return responses
