"""Export an Encoder to a single ONNX file with the serving contract built in.

The graph takes ``images`` as uint8 NHWC at the model's image size (any batch) and returns
``embeddings`` float32 [N, D], unit norm: scaling, mean/std normalisation and the final L2
normalisation all live inside the graph, so every client sends raw pixels.

Other input sizes: the graph is fixed at the model's image size (``ascl.image_size`` in the
metadata). Clients bring any image to it with ``ascl.images.decode_image(data, size)`` (RGB,
shorter side resized to ``size``, centre crop), the same rule as training-time evaluation,
the Triton ``preprocess`` model and the demo, so every path sees the same pixels.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

from ascl import __version__
from ascl.atomic import atomic_write_bytes
from ascl.encoder import Encoder
from ascl.names import (
    ARCH_KEY,
    EMBEDDING_DIM_KEY,
    EMBEDDINGS,
    IMAGE_SIZE_KEY,
    IMAGES,
    MEAN_KEY,
    MODEL_NAME_KEY,
    PRECISION_KEY,
    SOURCE_REVISION_KEY,
    STD_KEY,
    STEM_KEY,
    VERSION_KEY,
)

__all__ = ["DEFAULT_OPSET", "PRECISION_KEY", "UInt8Encoder", "encoder_to_onnx", "export_onnx", "metadata_props",
           "read_metadata", "set_metadata"]
DEFAULT_OPSET = 17


class UInt8Encoder(nn.Module):
    """The exported module: an Encoder taking uint8 NHWC pixels. [N, H, W, 3] u8 -> [N, D] f32.

    Preprocessing is the Encoder's own rule (``Encoder.normalize_uint8``), traced into the
    graph, so PyTorch, ONNX and every server apply the same arithmetic.
    """

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.encoder.normalize_uint8(images))  # [N, D], unit norm


def metadata_props(encoder: Encoder, model_name: str, source_revision: str) -> dict[str, str]:
    """The facts a server needs without loading PyTorch, stored as ONNX metadata."""
    return {
        MODEL_NAME_KEY: model_name,
        ARCH_KEY: encoder.arch,
        STEM_KEY: encoder.stem,
        EMBEDDING_DIM_KEY: str(encoder.embedding_dim),
        IMAGE_SIZE_KEY: str(encoder.image_size),
        MEAN_KEY: ",".join(f"{m:.6f}" for m in encoder.mean),
        STD_KEY: ",".join(f"{s:.6f}" for s in encoder.std),
        SOURCE_REVISION_KEY: source_revision,
        VERSION_KEY: __version__,
        PRECISION_KEY: "fp32",
    }


def set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Set (add or overwrite) metadata props on ``model`` in place."""
    existing = {entry.key: entry for entry in model.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The metadata props of an in-memory ``model`` as a dict (a file: ``ascl.export.runtime.onnx_metadata``)."""
    return {entry.key: entry.value for entry in model.metadata_props}


def encoder_to_onnx(
    encoder: Encoder,
    *,
    opset: int = DEFAULT_OPSET,
    model_name: str = "encoder",
    source_revision: str = "unknown",
) -> onnx.ModelProto:
    """Trace ``encoder`` (wrapped by UInt8Encoder, eval mode, BatchNorm folded) to a checked
    in-memory ONNX model with the serving contract and metadata."""
    wrapper = UInt8Encoder(encoder).eval()
    size = encoder.image_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # [N, S, S, 3]
    buf = io.BytesIO()
    was_training = encoder.training
    encoder.eval()
    try:
        # The TorchScript exporter: deprecated in favour of torch.export (dynamo), but it gives the
        # compact, constant-folded graph (BatchNorm folded into Conv) that the parity checks pin.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapper,
                (example,),
                buf,  # type: ignore[arg-type]  # a file object works; the stub says path only
                input_names=[IMAGES],
                output_names=[EMBEDDINGS],
                dynamic_axes={IMAGES: {0: "batch"}, EMBEDDINGS: {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
    finally:
        encoder.train(was_training)
    model = onnx.load_from_string(buf.getvalue())
    model.doc_string = (
        f"ascl-hub encoder: {IMAGES} uint8 [N, {size}, {size}, 3] (resize other sizes with "
        f"ascl.images.decode_image) -> {EMBEDDINGS} float32 [N, {encoder.embedding_dim}], unit norm"
    )
    # The exporter leaves the embedding width symbolic after the L2 normalisation; native
    # Triton backends and TensorRT need the static [batch, D] shape.
    out_dims = model.graph.output[0].type.tensor_type.shape.dim  # [batch, D]
    out_dims[1].Clear()
    out_dims[1].dim_value = encoder.embedding_dim
    set_metadata(model, metadata_props(encoder, model_name, source_revision))
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(
    encoder: Encoder,
    out_path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    model_name: str = "encoder",
    source_revision: str = "unknown",
) -> Path:
    """Export ``encoder`` to ``out_path`` (one file, written atomically) and return the path.

    No parity check here: ``ascl.export.pipeline.export_model`` adds it (and fp16/int8).
    """
    out_path = Path(out_path)
    model = encoder_to_onnx(encoder, opset=opset, model_name=model_name, source_revision=source_revision)
    atomic_write_bytes(out_path, model.SerializeToString())
    return out_path
