"""Triton Python model `preprocess`: encoded image bytes -> uint8 NHWC at the model's size.

Generated into a model repository by ``ascl.serving.online.repository``. Each request is checked and
decoded on its own (at least one image, at most ``max_request_bytes`` in all, every image
within the decode limits of ``ascl.images``), so a bad request fails alone.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ascl.images import decode_image
from ascl.names import IMAGE_BYTES, IMAGES
from ascl.serving.online.request_errors import RequestError, error_response


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (127, 127, 127)).save(buf, format="PNG")
    return buf.getvalue()


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = json.loads(args["model_config"])["parameters"]
        self.size = int(params["image_size"]["string_value"])
        self.max_bytes = int(params["max_image_bytes"]["string_value"])
        self.max_request_bytes = int(params["max_request_bytes"]["string_value"])
        decode_image(_tiny_png(), self.size)  # warm-up: loads the PIL codecs before the first request

    def _decode(self, request: Any) -> Any:
        data = pb_utils.get_input_tensor_by_name(request, IMAGE_BYTES).as_numpy().reshape(-1)  # [B] bytes
        if len(data) == 0:
            raise RequestError("the request holds no image; send at least one")
        total = sum(len(item) for item in data)
        if total > self.max_request_bytes:
            raise RequestError(f"the request holds {total / 2**20:.1f} MiB of images, over the "
                               f"{self.max_request_bytes / 2**20:.0f} MiB limit; send fewer images per request")
        pixels = [
            decode_image(bytes(item), self.size, name=f"image {i}", max_bytes=self.max_bytes)
            for i, item in enumerate(data)
        ]
        return pb_utils.InferenceResponse([pb_utils.Tensor(IMAGES, np.stack(pixels))])  # [B, S, S, 3]

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._decode(request))
            except Exception as exc:  # this request alone fails; the rest of the batch is answered
                responses.append(error_response(pb_utils, "preprocess", exc))
        return responses
