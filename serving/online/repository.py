"""Write Triton model repositories: the embedded one (Python backend only) and the production one.

The repository is data: ``config.pbtxt`` files built as ``ModelConfig`` protobufs (the schema
tritonclient ships), the Python models from ``templates/``, and a vendored copy of the few
``ascl`` modules they import, so the same files run in NVIDIA's Triton container where ascl is
not installed.

Both repositories serve the same models under the same names and tensors (``ascl.names``):
``preprocess``, ``encoder`` and ``search`` alone, and ``image_search`` / ``embed`` for clients.
In the embedded repository ``image_search`` and ``embed`` are one Python model each
(``templates/fused.py``: decode, embed and search in one stub); in the production one they are
ensembles that chain ``preprocess`` -> the native encoder (``onnxruntime_onnx`` or
``tensorrt_plan``) -> ``search``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ascl import names
from ascl.atomic import atomic_dir
from ascl.export.profiles import TRT_MAX_BATCH, TRT_OPT_BATCH
from ascl.serving.online.limits import MAX_QUEUE_SIZE

if TYPE_CHECKING:
    from ascl.export.runtime import OnnxFacts
    from ascl.serving.collections.index import IndexSpec

TEMPLATES = Path(__file__).resolve().parent / "templates"
# The ``ascl`` modules the Python models import (tests/test_architecture.py checks that this covers
# every import of the templates, transitively), vendored into each model's version folder.
VENDORED_MODULES = (
    "ascl", "ascl.errors", "ascl.names", "ascl.images", "ascl.atomic",
    "ascl.serving", "ascl.serving.collections", "ascl.serving.collections.index",
    "ascl.serving.collections.index_types", "ascl.serving.collections.faiss_index",
    "ascl.serving.collections.faiss_filters", "ascl.serving.collections.filters",
    "ascl.serving.collections.milvus_index",
    "ascl.serving.online", "ascl.serving.online.request_errors", "ascl.serving.online.model_steps",
    "ascl.export", "ascl.export.runtime",
)


def vendored_files() -> dict[str, Path]:
    """``ascl/<path>`` in a model folder -> the installed source file, for every vendored module
    (found by import machinery, so editable and regular installs both work)."""
    import importlib.util

    files = {}
    for module in VENDORED_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"{module}: not found, cannot vendor it into the model repository")
        parts = module.split(".")[1:]
        rel = "/".join(parts + ["__init__.py"]) if spec.submodule_search_locations is not None else "/".join(parts) + ".py"
        files[rel] = Path(spec.origin)
    return files


# Batch limits: the TensorRT optimization profile (min/opt/max) of `ascl export tensorrt`.
REQUEST_MAX_BATCH = 64  # images per request through image_search and embed
ENCODER_MAX_BATCH = TRT_MAX_BATCH
MAX_INSTANCES = 4
TRITON_CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, the version pytriton ships


@dataclass(frozen=True)
class Batching:
    """How the models batch requests.

    ``queue_delay_us``: how long every model's dynamic batcher may hold a request to fill a
    larger batch. A lone request waits all of it, so the default is 0: Triton then batches what
    queued while every instance was busy, which under load is the batch a wait would have made
    (on a CPU, ONNX Runtime's images/s barely grows past batch 4). Raise it for a GPU encoder
    whose rate grows with the batch, and measure (``benchmarks/serve_load.py --ab-delay-us``).
    ``max_queue_size``: requests each model's queue holds; more are refused at once (UNAVAILABLE /
    503) rather than queued without end: backpressure a client can see and retry.
    ``instances``: instances of the Python models on the hot path (the fused ``image_search`` and
    ``embed``, and ``encoder``), one ONNX Runtime thread each; 0 = one per core, at most 4. Each
    fused ``image_search`` instance holds its own copy of the index in memory.
    """

    queue_delay_us: int = 0
    instances: int = 0
    max_queue_size: int = MAX_QUEUE_SIZE

    def __post_init__(self) -> None:
        if self.queue_delay_us < 0 or self.instances < 0:
            raise ValueError(f"queue delay and instances must be >= 0, got {self.queue_delay_us} us and "
                             f"{self.instances} instances")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be at least 1, got {self.max_queue_size}")

    @property
    def instance_count(self) -> int:
        return self.instances or max(1, min(os.cpu_count() or 1, MAX_INSTANCES))


def _pb() -> Any:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _tensor(spec: Any, name: str, dtype: str, dims: list[int]) -> None:
    spec.name, spec.data_type, spec.dims[:] = name, _pb().DataType.Value(dtype), dims


def dynamic_batching(config: Any, batching: Batching, preferred: Sequence[int] = ()) -> None:
    """The one place a model's ``dynamic_batching`` block is written (every batched model)."""
    config.dynamic_batching.SetInParent()  # batching stays on at a delay of 0
    config.dynamic_batching.max_queue_delay_microseconds = batching.queue_delay_us
    config.dynamic_batching.preferred_batch_size[:] = list(preferred)
    policy = config.dynamic_batching.default_queue_policy  # a bounded queue; REJECT the rest
    policy.max_queue_size = batching.max_queue_size
    policy.timeout_action = _pb().ModelQueuePolicy.REJECT


def _python_model(config: Any, max_batch: int, params: dict[str, str], batching: Batching,
                  instances: int = 1) -> None:
    config.backend = "python"
    config.max_batch_size = max_batch
    dynamic_batching(config, batching)
    group = config.instance_group.add()
    group.count, group.kind = instances, _pb().ModelInstanceGroup.KIND_CPU
    for key, value in params.items():
        config.parameters[key].string_value = value


def _decode_params(facts: OnnxFacts, max_image_bytes: int, max_request_bytes: int) -> dict[str, str]:
    return {"image_size": str(facts.image_size), "max_image_bytes": str(max_image_bytes),
            "max_request_bytes": str(max_request_bytes)}


def preprocess_config(facts: OnnxFacts, max_image_bytes: int, max_request_bytes: int,
                      batching: Batching = Batching()) -> Any:
    """No config warm-up (Triton 2.51's TYPE_STRING warm-up files did not reach the Python model
    intact); ``initialize`` decodes one image instead."""
    s = facts.image_size
    config = _pb().ModelConfig(name=names.MODEL_PREPROCESS)
    _python_model(config, REQUEST_MAX_BATCH, _decode_params(facts, max_image_bytes, max_request_bytes), batching)
    _tensor(config.input.add(), names.IMAGE_BYTES, "TYPE_STRING", [1])
    _tensor(config.output.add(), names.IMAGES, "TYPE_UINT8", [s, s, 3])
    return config


def encoder_config(facts: OnnxFacts, platform: str, batching: Batching = Batching()) -> Any:
    """`python` (embedded: ONNX Runtime in the Python backend), `onnxruntime` or `tensorrt`."""
    s = facts.image_size
    config = _pb().ModelConfig(name=names.MODEL_ENCODER)
    if platform == "python":
        # One ONNX Runtime thread per instance, one instance per core: batches run side by side.
        _python_model(config, ENCODER_MAX_BATCH, {"onnx_file": "model.onnx", "threads": "1",
                                                  "precision": facts.precision},
                      batching, instances=batching.instance_count)
    else:
        config.platform = "onnxruntime_onnx" if platform == "onnxruntime" else "tensorrt_plan"
        config.max_batch_size = ENCODER_MAX_BATCH
        dynamic_batching(config, batching, preferred=[TRT_OPT_BATCH, TRT_MAX_BATCH])
    _tensor(config.input.add(), names.IMAGES, "TYPE_UINT8", [s, s, 3])
    _tensor(config.output.add(), names.EMBEDDINGS, "TYPE_FP32", [facts.embedding_dim])
    for batch in (1, 8):
        warm = config.model_warmup.add(name=f"zeros_batch_{batch}", batch_size=batch)
        warm.inputs[names.IMAGES].data_type = _pb().DataType.Value("TYPE_UINT8")
        warm.inputs[names.IMAGES].dims[:] = [s, s, 3]
        warm.inputs[names.IMAGES].zero_data = True
    return config


def search_config(facts: OnnxFacts, index_dir: str, batching: Batching = Batching()) -> Any:
    """No warm-up: a k that is valid depends on the index; ``initialize`` loads the index instead."""
    config = _pb().ModelConfig(name=names.MODEL_SEARCH)
    _python_model(config, ENCODER_MAX_BATCH, {"index_dir": index_dir, "poll_seconds": "0.5"}, batching)
    _tensor(config.input.add(), names.EMBEDDINGS, "TYPE_FP32", [facts.embedding_dim])
    _search_io(config)
    return config


def _search_io(config: Any) -> None:
    """k, the optional filter, and the three outputs of every model that searches."""
    _tensor(config.input.add(), names.TOP_K, "TYPE_INT32", [1])
    _optional_where(config)
    _tensor(config.output.add(), names.IDS, "TYPE_INT64", [-1])
    _tensor(config.output.add(), names.SCORES, "TYPE_FP32", [-1])
    _tensor(config.output.add(), names.METADATA, "TYPE_STRING", [-1])


def fused_config(facts: OnnxFacts, name: str, *, index_dir: str | None, max_image_bytes: int, max_request_bytes: int,
                 batching: Batching = Batching()) -> Any:
    """`image_search` (with ``index_dir``) or `embed` (without) as one Python model (``templates/fused.py``),
    with the tensors of the ensemble it replaces. No config warm-up: ``initialize`` runs one."""
    config = _pb().ModelConfig(name=name)
    params = {"task": "search" if index_dir is not None else "embed", "onnx_file": "model.onnx", "threads": "1",
              "precision": facts.precision, **_decode_params(facts, max_image_bytes, max_request_bytes)}
    if index_dir is not None:
        params.update(index_dir=index_dir, poll_seconds="0.5")
    _python_model(config, REQUEST_MAX_BATCH, params, batching, instances=batching.instance_count)
    _tensor(config.input.add(), names.IMAGE_BYTES, "TYPE_STRING", [1])
    if index_dir is not None:
        _search_io(config)
    else:
        _tensor(config.output.add(), names.EMBEDDINGS, "TYPE_FP32", [facts.embedding_dim])
    return config


def _optional_where(config: Any) -> None:
    """The metadata filter input: optional, so that clients that send none (older ones) keep working."""
    where = config.input.add()
    _tensor(where, names.WHERE, "TYPE_STRING", [1])
    where.optional = True


def _step(config: Any, model: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    step = config.ensemble_scheduling.step.add(model_name=model, model_version=-1)
    for key, value in inputs.items():
        step.input_map[key] = value
    for key, value in outputs.items():
        step.output_map[key] = value


def embed_config(facts: OnnxFacts) -> Any:
    config = _pb().ModelConfig(name=names.MODEL_EMBED, platform="ensemble", max_batch_size=REQUEST_MAX_BATCH)
    _tensor(config.input.add(), names.IMAGE_BYTES, "TYPE_STRING", [1])
    _tensor(config.output.add(), names.EMBEDDINGS, "TYPE_FP32", [facts.embedding_dim])
    _step(config, names.MODEL_PREPROCESS, {names.IMAGE_BYTES: names.IMAGE_BYTES}, {names.IMAGES: "_pixels"})
    _step(config, names.MODEL_ENCODER, {names.IMAGES: "_pixels"}, {names.EMBEDDINGS: names.EMBEDDINGS})
    return config


def image_search_config(facts: OnnxFacts) -> Any:
    config = _pb().ModelConfig(name=names.MODEL_IMAGE_SEARCH, platform="ensemble", max_batch_size=REQUEST_MAX_BATCH)
    _tensor(config.input.add(), names.IMAGE_BYTES, "TYPE_STRING", [1])
    _search_io(config)  # `where` is mapped to the search step's optional input: absent there when absent here
    _step(config, names.MODEL_PREPROCESS, {names.IMAGE_BYTES: names.IMAGE_BYTES}, {names.IMAGES: "_pixels"})
    _step(config, names.MODEL_ENCODER, {names.IMAGES: "_pixels"}, {names.EMBEDDINGS: "_embeddings"})
    _step(config, names.MODEL_SEARCH,
          {names.EMBEDDINGS: "_embeddings", names.TOP_K: names.TOP_K, names.WHERE: names.WHERE},
          {names.IDS: names.IDS, names.SCORES: names.SCORES, names.METADATA: names.METADATA})
    return config


def write_config(folder: Path, config: Any) -> None:
    from google.protobuf import text_format

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


def _python_files(version_dir: Path, template: str) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(TEMPLATES / f"{template}.py", version_dir / "model.py")
    for rel, src in vendored_files().items():
        dest = version_dir / "ascl" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        dest.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dest)


def _fused_models(repo: Path, onnx_path: Path, facts: OnnxFacts, index_param: str, max_image_bytes: int,
                  max_request_bytes: int, batching: Batching) -> None:
    """`embed` and `image_search` of the embedded repository, one Python model each (``templates/fused.py``)."""
    for name, index in ((names.MODEL_EMBED, None), (names.MODEL_IMAGE_SEARCH, index_param)):
        write_config(repo / name, fused_config(facts, name, index_dir=index, max_image_bytes=max_image_bytes,
                                               max_request_bytes=max_request_bytes, batching=batching))
        _python_files(repo / name / "1", "fused")
        _link_or_copy(onnx_path, repo / name / "1" / "model.onnx")


def write_repository(
    out: str | Path, onnx_path: str | Path, index_dir: IndexSpec, *, platform: str = "python",
    plan_path: str | Path | None = None, copy_index: bool = False, max_image_bytes: int | None = None,
    max_request_bytes: int | None = None, facts: OnnxFacts | None = None, batching: Batching | None = None,
    max_queue_size: int | None = None,
) -> Path:
    """Write a complete model repository to ``out`` (atomically) and return it.

    ``platform``: ``python`` (embedded server: `image_search` and `embed` fused), ``onnxruntime``
    or ``tensorrt`` (production: ensembles around the native encoder).
    ``copy_index``: copy the index's current version into the repository (production) instead
    of pointing at ``index_dir`` (embedded: `ascl index add` updates are picked up live).
    ``max_queue_size``: requests each model's queue holds, overriding ``batching``'s; more are
    refused (UNAVAILABLE / 503).
    ``facts``: the encoder's, when the caller has read them already (else read from ``onnx_path``).
    ``batching``: queue delays and instances (``Batching``; default: no delay, one instance per core).
    """
    from ascl.images import MAX_IMAGE_BYTES, MAX_REQUEST_BYTES
    from ascl.serving.collections.index import as_spec, read_info
    from ascl.serving.collections.index import copy_index as copy_current_version

    if platform not in ("python", "onnxruntime", "tensorrt"):
        raise ValueError(f"unknown platform {platform!r}; choose python, onnxruntime or tensorrt")
    onnx_path = Path(onnx_path).resolve()
    index_dir = as_spec(index_dir)
    index_dir = index_dir.resolve() if isinstance(index_dir, Path) else index_dir
    info = read_info(index_dir)
    if facts is None:
        from ascl.export.runtime import onnx_facts

        facts = onnx_facts(onnx_path)
    if int(info["dim"]) != facts.embedding_dim:
        raise ValueError(
            f"{index_dir}: index dim {info['dim']} does not match the model's embedding dim "
            f"{facts.embedding_dim}; rebuild the index with this model"
        )
    batching = batching or Batching()
    if max_queue_size is not None:
        batching = dataclasses.replace(batching, max_queue_size=max_queue_size)
    image_bytes, request_bytes = max_image_bytes or MAX_IMAGE_BYTES, max_request_bytes or MAX_REQUEST_BYTES
    with atomic_dir(out) as repo:
        pre = repo / names.MODEL_PREPROCESS
        write_config(pre, preprocess_config(facts, image_bytes, request_bytes, batching))
        _python_files(pre / "1", "preprocess")

        enc = repo / names.MODEL_ENCODER
        write_config(enc, encoder_config(facts, platform, batching))
        (enc / "1").mkdir(parents=True)
        if platform == "python":
            _python_files(enc / "1", "encoder")
            _link_or_copy(onnx_path, enc / "1" / "model.onnx")
        elif platform == "onnxruntime":
            _link_or_copy(onnx_path, enc / "1" / "model.onnx")
        elif plan_path is not None:
            shutil.copy2(plan_path, enc / "1" / "model.plan")

        search = repo / names.MODEL_SEARCH
        _python_files(search / "1", "search")
        index_param = copy_current_version(index_dir, search / "1" / "index") if copy_index else str(index_dir)
        write_config(search, search_config(facts, index_param, batching))

        if platform == "python":
            copied = copy_index and "://" not in index_param  # in the search model's folder: reached from the fused one
            fused_index = f"../../{names.MODEL_SEARCH}/1/{index_param}" if copied else index_param
            _fused_models(repo, onnx_path, facts, fused_index, image_bytes, request_bytes, batching)
        else:
            for config in (embed_config(facts), image_search_config(facts)):
                write_config(repo / config.name, config)
                (repo / config.name / "1").mkdir()
    return Path(out)


def docker_command(repository: str | Path, *, gpus: bool = True) -> str:
    """The `docker run` line that serves a production repository in NVIDIA's Triton container."""
    repo = Path(repository).resolve()
    gpu = "--gpus all " if gpus else ""
    return (
        f"docker run --rm {gpu}--shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 "
        f"-v {repo}:/models {TRITON_CONTAINER} "
        "bash -c 'pip install --quiet faiss-cpu pillow && tritonserver --model-repository=/models'"
    )
