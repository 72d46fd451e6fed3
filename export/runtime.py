"""Run an exported encoder with ONNX Runtime: the embedding path shared by index, serving, demo.

Also the one reader of an export's ``ascl.*`` metadata (keys: ``ascl.names``): ``onnx_metadata``
for a file (cached, no session), ``OnnxFacts`` for what serving needs of it (image size,
embedding dim, precision), read the same way from a file or from a running session.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ascl.names import EMBEDDING_DIM_KEY, EMBEDDINGS, IMAGE_SIZE_KEY, IMAGES, PRECISION_KEY

# Short names accepted by --providers, in ONNX Runtime's spelling.
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
ProviderSpec = str | tuple[str, dict[str, str]]


def cuda_driver_present() -> bool:
    """True when the NVIDIA driver library loads: onnxruntime-gpu lists the CUDA provider even
    without one, then logs an error at every session creation."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build can use it and a driver is present, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider"] if cuda_driver_present() else []
    return [p for p in (*wanted, "CPUExecutionProvider") if p in available]


def resolve_providers(names: Sequence[str], *, image_size: int | None = None) -> list[ProviderSpec]:
    """``["tensorrt", "cuda", "cpu"]`` (short or full names) -> ONNX Runtime providers, in order.

    Raises ValueError naming a provider this onnxruntime build lacks or that has no GPU driver.
    The TensorRT provider gets the batch profile of ``ascl.export.profiles`` (needs ``image_size``).
    """
    import onnxruntime as ort

    from ascl.export.profiles import TRT_MAX_BATCH, TRT_MIN_BATCH, TRT_OPT_BATCH

    available = ort.get_available_providers()
    out: list[ProviderSpec] = []
    for name in names:
        full = PROVIDER_NAMES.get(name.lower(), name)
        if full not in available:
            raise ValueError(f"execution provider {name!r} is not in this onnxruntime build (available: {available})")
        if full != "CPUExecutionProvider" and not cuda_driver_present():
            raise ValueError(f"execution provider {name!r} needs an NVIDIA GPU driver (libcuda.so.1), none found")
        if full == "TensorrtExecutionProvider" and image_size:
            shape = f"{IMAGES}:{{}}x{image_size}x{image_size}x3"
            out.append((full, {
                "trt_profile_min_shapes": shape.format(TRT_MIN_BATCH),
                "trt_profile_opt_shapes": shape.format(TRT_OPT_BATCH),
                "trt_profile_max_shapes": shape.format(TRT_MAX_BATCH),
            }))
        else:
            out.append(full)
    return out


@dataclass(frozen=True)
class OnnxFacts:
    """What a server needs to know of an exported encoder: its input size, output dim and precision."""

    image_size: int
    embedding_dim: int
    precision: str = "fp32"

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], image_size: object, embedding_dim: object) -> OnnxFacts:
        """The facts from ``ascl.*`` metadata, else from the graph's static shapes (given)."""
        return cls(int(metadata.get(IMAGE_SIZE_KEY, image_size)),  # type: ignore[call-overload]
                   int(metadata.get(EMBEDDING_DIM_KEY, embedding_dim)),  # type: ignore[call-overload]
                   metadata.get(PRECISION_KEY, "fp32"))


def onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of an ONNX file (cached per file path, size and modification time; no session)."""
    return dict(_read(*_stat_key(path))[0])


def onnx_facts(path: str | os.PathLike[str]) -> OnnxFacts:
    """``OnnxFacts`` of an ONNX file, read once per file version (no session is created)."""
    props, size, dim = _read(*_stat_key(path))
    return OnnxFacts.from_metadata(dict(props), size, dim)


def _stat_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file; create it with 'ascl export onnx MODEL --out DIR'")
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=32)
def _read(path: str, size: int, mtime_ns: int) -> tuple[tuple[tuple[str, str], ...], object, object]:
    """(metadata, the input's image size, the output's dim) of one file version."""
    del size, mtime_ns  # part of the cache key only
    try:
        import onnx

        model = onnx.load(path, load_external_data=False)
        props = {entry.key: entry.value for entry in model.metadata_props}
        in_dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
        out_dims = [d.dim_value or d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim]
    except ImportError:  # a serving-only install: ONNX Runtime reads it too
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        props = dict(session.get_modelmeta().custom_metadata_map)
        in_dims, out_dims = session.get_inputs()[0].shape, session.get_outputs()[0].shape
    except Exception as exc:  # onnx raises its own types for a file that is no model
        raise ValueError(f"{path}: not a loadable ONNX model ({exc})") from exc
    return tuple(sorted(props.items())), (in_dims[1:2] or [None])[0], (out_dims[1:2] or [None])[0]


class OnnxEmbedder:
    """An ONNX Runtime session over an exported encoder, with its metadata.

    Set-up (session creation) happens once here; ``embed`` is a thin call.
    """

    def __init__(
        self,
        onnx_path: str | Path,
        providers: Sequence[ProviderSpec] | None = None,
        threads: int = 0,
        *,
        spinning: bool = True,
    ) -> None:
        """``providers``: ONNX Runtime providers (default ``default_providers()``); ``threads``:
        intra-op threads (0 = one per core); ``spinning=False`` stops idle worker threads from
        busy-waiting after each call (a little latency for much less CPU stolen from others on
        shared cores)."""
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file; create it with 'ascl export onnx MODEL --out DIR'")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=list(providers or default_providers())
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"{path}: not a loadable ONNX model ({exc})") from exc
        self.path = path
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if names_in != [IMAGES] or EMBEDDINGS not in names_out:
            raise ValueError(
                f"{path}: expected input {IMAGES!r} and output {EMBEDDINGS!r}, got {names_in} -> {names_out}; "
                "is this an ascl export?"
            )
        shape = self.session.get_inputs()[0].shape  # ['batch', H, W, 3]
        self.facts = OnnxFacts.from_metadata(self.metadata, shape[1], self.session.get_outputs()[0].shape[1])
        self.image_size = self.facts.image_size
        self.embedding_dim = self.facts.embedding_dim
        self.precision = self.facts.precision
        self.providers: list[str] = list(self.session.get_providers())

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, D] unit-norm embeddings."""
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise TypeError(f"expected a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"expected images of shape [N, {s}, {s}, 3], got {list(images.shape)}")
        if images.shape[0] == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        (out,) = self.session.run([EMBEDDINGS], {IMAGES: np.ascontiguousarray(images)})
        return np.asarray(out, dtype=np.float32)
