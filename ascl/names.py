"""Tensor and model names: the contract between export, the Triton configs, clients and tests.

Every place that names a tensor imports it from here, so a rename cannot drift.
"""

from __future__ import annotations

# Exported encoder graph: uint8 NHWC images in, float32 [N, D] unit-norm embeddings out.
IMAGES = "images"
EMBEDDINGS = "embeddings"

# Serving: encoded image bytes, search inputs and outputs.
IMAGE_BYTES = "image_bytes"
TOP_K = "k"
IDS = "ids"
SCORES = "scores"
METADATA = "metadata"
WHERE = "where"  # optional: a metadata filter as JSON text per row ({"label": "cat"}), see ascl.serving.collections.filters

# Encoder precisions a server may serve (the values of the ONNX metadata key ascl.precision).
PRECISIONS = ("fp32", "int8")

# Triton model names in the generated repository.
MODEL_PREPROCESS = "preprocess"
MODEL_ENCODER = "encoder"
MODEL_SEARCH = "search"
MODEL_EMBED = "embed"
MODEL_IMAGE_SEARCH = "image_search"
