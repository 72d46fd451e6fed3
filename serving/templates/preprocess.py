"""Triton Python model `preprocess`: encoded image bytes -> uint8 NHWC at the model's size.

Generated into a model repository by ``ascl.serving.repository``. Each request is decoded on
its own, so a corrupt or oversized image fails that request only.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ascl.images import ImageError, decode_image
from ascl.names import IMAGE_BYTES, IMAGES


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
        decode_image(_tiny_png(), self.size)  # warm-up: loads the PIL codecs before the first request

    def _decode(self, request: Any) -> Any:
        data = pb_utils.get_input_tensor_by_name(request, IMAGE_BYTES).as_numpy().reshape(-1)  # [B] bytes
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
            except ImageError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
