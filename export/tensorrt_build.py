"""Build and run TensorRT engines (``.plan``) from the exported ONNX graph.

TensorRT is an optional extra (``pip install 'ascl-hub[tensorrt]'``, NVIDIA GPU required).
The engine gets one optimization profile over the batch axis, from ``ascl.export.profiles``,
the same numbers the Triton ``tensorrt_plan`` config uses. Build from the fp32 graph (with
``fp16=True`` for half precision): the int8 graph is calibrated for ONNX Runtime (uint8,
asymmetric activations), which TensorRT's explicit quantization does not take.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ascl.atomic import atomic_write_bytes
from ascl.errors import AsclError
from ascl.export.profiles import TRT_MAX_BATCH, TRT_MIN_BATCH, TRT_OPT_BATCH, check_profile
from ascl.names import EMBEDDINGS, IMAGES

INSTALL_HINT = "install it with: pip install 'ascl-hub[tensorrt]' (needs an NVIDIA GPU and driver)"


class TensorRTUnavailable(AsclError, RuntimeError):
    """The tensorrt package (or a GPU for it) is missing; the message says how to get it."""


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or TensorRTUnavailable with the install command."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from exc
    return tensorrt


def tensorrt_skip_reason() -> str | None:
    """Why TensorRT cannot run here (for pytest skips), or None when it can."""
    try:
        import_tensorrt()
    except TensorRTUnavailable as exc:
        return str(exc)
    import torch

    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)"
    return None


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    min_batch: int = TRT_MIN_BATCH,
    opt_batch: int = TRT_OPT_BATCH,
    max_batch: int = TRT_MAX_BATCH,
    fp16: bool = False,
    workspace_gib: float = 4.0,
) -> Path:
    """Parse ``onnx_path``, build a serialized engine for batches min..max, write it atomically."""
    trt = import_tensorrt()
    from ascl.export.runtime import OnnxEmbedder

    check_profile(min_batch, opt_batch, max_batch)
    meta = OnnxEmbedder(onnx_path, providers=["CPUExecutionProvider"])  # validates the contract
    size = meta.image_size
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch (the only mode in TensorRT 10)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"{onnx_path}: TensorRT cannot parse this ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(IMAGES, (min_batch, size, size, 3), (opt_batch, size, size, 3), (max_batch, size, size, 3))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    plan_path = Path(plan_path)
    atomic_write_bytes(plan_path, bytes(plan))
    return plan_path


class TensorRTEmbedder:
    """Runs a ``.plan`` on the GPU: uint8 [N, S, S, 3] -> float32 [N, D], like OnnxEmbedder."""

    def __init__(self, plan_path: str | Path) -> None:
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailable("TensorRT needs a CUDA GPU; none is visible")
        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine: Any = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise ValueError(f"{plan_path}: not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        shape = self.engine.get_tensor_shape(IMAGES)  # (-1, S, S, 3)
        self.image_size = int(shape[1])
        self.embedding_dim = int(self.engine.get_tensor_shape(EMBEDDINGS)[1])

    def embed(self, images: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(images)).cuda()  # [N, S, S, 3] uint8
        out = torch.empty((x.shape[0], self.embedding_dim), dtype=torch.float32, device="cuda")  # [N, D]
        self.context.set_input_shape(IMAGES, tuple(x.shape))
        self.context.set_tensor_address(IMAGES, x.data_ptr())
        self.context.set_tensor_address(EMBEDDINGS, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu().numpy()
