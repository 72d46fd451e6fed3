"""Tensor, model and metadata names: the contract between export, the Triton configs, clients and tests.

Every place that names a tensor or an ONNX metadata key imports it from here, so a rename cannot drift.
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

# ONNX metadata of an exported encoder: written by ascl.export.onnx_export, read by
# ascl.export.runtime (onnx_metadata, OnnxFacts) and nowhere else.
MODEL_NAME_KEY = "ascl.model_name"
ARCH_KEY = "ascl.arch"
STEM_KEY = "ascl.stem"
EMBEDDING_DIM_KEY = "ascl.embedding_dim"
IMAGE_SIZE_KEY = "ascl.image_size"
MEAN_KEY = "ascl.mean"
STD_KEY = "ascl.std"
SOURCE_REVISION_KEY = "ascl.source_revision"
VERSION_KEY = "ascl.version"
PRECISION_KEY = "ascl.precision"  # fp32, fp16 or int8
# The keys that must agree between an ONNX file and the encoder it claims to be exported from.
STRUCTURE_KEYS = (ARCH_KEY, STEM_KEY, EMBEDDING_DIM_KEY, IMAGE_SIZE_KEY, MEAN_KEY, STD_KEY)

# Triton model names in the generated repository.
MODEL_PREPROCESS = "preprocess"
MODEL_ENCODER = "encoder"
MODEL_SEARCH = "search"
MODEL_EMBED = "embed"
MODEL_IMAGE_SEARCH = "image_search"
