"""Triton Python model `preprocess`: encoded image bytes -> uint8 NHWC at the model's size.

Generated into a model repository by ``ascl.serving.online.repository``. Each request is checked and
decoded on its own (``model_steps.request_images``: at least one image, at most
``max_request_bytes`` in all, every image within the decode limits of ``ascl.images``), so a bad
request fails alone.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ascl.images import decode_image
from ascl.names import IMAGE_BYTES, IMAGES
from ascl.serving.online.model_steps import request_images, tiny_png
from ascl.serving.online.request_errors import error_response


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = json.loads(args["model_config"])["parameters"]
        self.size = int(params["image_size"]["string_value"])
        self.max_bytes = int(params["max_image_bytes"]["string_value"])
        self.max_request_bytes = int(params["max_request_bytes"]["string_value"])
        decode_image(tiny_png(), self.size)  # warm-up: loads the PIL codecs before the first request

    def _decode(self, request: Any) -> Any:
        data = pb_utils.get_input_tensor_by_name(request, IMAGE_BYTES).as_numpy()  # [B, 1] bytes
        pixels = request_images(data, self.size, max_image_bytes=self.max_bytes,
                                max_request_bytes=self.max_request_bytes)  # [B, S, S, 3]
        return pb_utils.InferenceResponse([pb_utils.Tensor(IMAGES, np.ascontiguousarray(pixels))])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._decode(request))
            except Exception as exc:  # this request alone fails; the rest of the batch is answered
                responses.append(error_response(pb_utils, "preprocess", exc))
        return responses
