"""Static INT8 quantization (QDQ, per-channel) of an exported fp32 graph with ONNX Runtime.

Recipe (onnxruntime.quantization): ``quant_pre_process`` (shape inference + graph
optimisation, so Conv+Relu fuse before quantization), then ``quantize_static`` in QDQ format with
per-channel int8 weights and uint8 activations (the U8S8 kernels ONNX Runtime's CPU and
TensorRT both run fast), calibrated on real images that go through the serving decode rule.
The graph keeps the uint8 input and float32 output. The input normalisation (Cast/Sub/Div), the
first convolution and the final L2 normalisation stay in float: the first conv sees 3 channels
(under 1% of the compute) but quantizing it cost 5x the embedding error on CIFAR-10 (min
cosine to fp32 0.994 vs 0.999 measured here), and the rest saves nothing.

What int8 buys depends on the CPU: with AVX2 alone (no VNNI) ONNX Runtime's uint8 x int8 kernels
reach about twice its fp32 rate, with VNNI or AMX several times more. ``benchmarks/inference.py``
measures both roofs beside the engines.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ascl.errors import AsclError
from ascl.names import IMAGES

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Only these ops get quantized: the compute lives here.
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Add", "Relu", "GlobalAveragePool"]


class CalibrationError(AsclError, ValueError):
    """Calibration data that cannot calibrate (empty, wrong shape)."""


class ImageBatches:
    """``CalibrationDataReader`` over uint8 images [N, S, S, 3], ``batch`` at a time."""

    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[0] == 0:
            raise CalibrationError(f"calibration needs uint8 images [N>0, S, S, 3], got {images.dtype} {images.shape}")
        self.images, self.batch, self.start = images, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.images):
            return None
        chunk = self.images[self.start : self.start + self.batch]  # [B, S, S, 3]
        self.start += self.batch
        return {IMAGES: np.ascontiguousarray(chunk)}

    def rewind(self) -> None:
        self.start = 0


def quantize_int8(
    fp32_model: onnx.ModelProto,
    calibration: np.ndarray,
    *,
    method: str = "minmax",
    per_channel: bool = True,
) -> onnx.ModelProto:
    """An int8 QDQ copy of ``fp32_model`` calibrated on ``calibration`` (uint8 [N, S, S, 3])."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {list(CALIBRATION_METHODS)}")
    reader = ImageBatches(calibration)
    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with tempfile.TemporaryDirectory(prefix="ascl-int8-") as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        onnx.save_model(fp32_model, src)
        quant_logger = logging.getLogger("onnxruntime.quantization")
        quant_logger.setLevel(logging.ERROR)  # its hints about pre-processing are what we already do
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        first_conv = next((n.name for n in onnx.load_model(pre).graph.node if n.op_type == "Conv"), None)
        quantize_static(
            str(pre),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=calibrate,
            op_types_to_quantize=QUANTIZED_OPS,
            nodes_to_exclude=[first_conv] if first_conv else [],
            extra_options={"CalibTensorRangeSymmetric": False, "ActivationSymmetric": False},
        )
        return onnx.load_model(dst)
