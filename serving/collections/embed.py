"""Bulk embedding: any image source of ``ascl.image_sources`` -> a Parquet embedding set.

``embed_collection(images, out, model=...)`` is ``ascl embed``: the model is resolved once
(``ascl.models.resolve_model``) and exported once (``ascl.export.cache.cached_onnx``; an
``.onnx`` model is used as it is), then every image of the source is read, hashed, decoded by
the one preprocessing rule (``ascl.images``) and embedded with ONNX Runtime
(``ascl.export.runtime.OnnxEmbedder``). Rows go to the set of ``ascl.serving.collections.parquet_set``
(part files, errors, manifest), which makes a run resumable: a re-run skips the positions of
the finished parts and goes on from there.

Two engines produce the same rows (same ids, same decode function, same ONNX file):

- ``local``: the one batch-embedding loop (``ascl.serving.collections.engine.run_local``):
  decoding runs on a thread pool that feeds whole batches through a bounded queue, while ONNX
  Runtime embeds the previous batches; the writer commits parts in the same thread.
- ``ray``: Ray Data on an existing engine (a cluster, or a local instance): the driver reads
  the source (file paths for folders and list files; encoded bytes for archives and the array
  sets), ``map_batches`` decodes in tasks, ``map_batches`` with an actor pool of ONNX Runtime
  sessions (CPU or GPU) embeds, and the driver streams the results in source order into the
  same writer. Needs ``pip install 'ascl-hub[scale]'``.

Unreadable images become rows of ``errors.parquet`` (id, path, error) and never stop a run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ascl.errors import AsclError
from ascl.export.identity import ensure_same_model, model_identity
from ascl.image_sources import ImageSpec, SourceImage, iter_images, parse_spec
from ascl.serving.collections.engine import decode_rows, decode_threads, local_embedder, run_local
from ascl.serving.collections.parquet_set import (
    DEFAULT_ROWS_PER_FILE,
    EmbeddingSetError,
    ResultBatch,
    SetWriter,
    exclusive,
    is_embedding_set,
    new_manifest,
    read_manifest,
    remove_stale_temporaries,
    require_pyarrow,
)

if TYPE_CHECKING:
    from ascl.export.runtime import OnnxEmbedder
    from ascl.models import ModelRef

__all__ = ["ENGINES", "EmbedReport", "RayMissingError", "RayOptions", "embed_collection"]

ENGINES = ("local", "ray")
RAY_INSTALL = "pip install 'ascl-hub[scale]' (or pip install 'ray[data]>=2.9')"
RAY_WINDOW_ITEMS = 1_000_000  # driver-side items per Ray dataset (paths are small) ...
RAY_WINDOW_BYTES = 512 * 2**20  # ... or encoded bytes read by the driver (archives, array sets)


class RayMissingError(AsclError, ImportError):
    """``--engine ray`` without Ray Data installed; the message says what to install."""


@dataclass
class RayOptions:
    """How the Ray engine runs: where, and how many ONNX Runtime actors with what resources.

    ``address``: ``None`` = ``$RAY_ADDRESS`` or a new local instance, ``auto`` = the running
    cluster this machine belongs to, ``ray://HOST:10001`` = a remote cluster through Ray Client,
    ``local`` = always a new local instance. ``actors``: the actor pool size (0 = one per
    ``num_gpus_per_actor`` GPUs when GPUs are asked for, else the cluster's CPUs minus the
    decode CPUs, over ``num_cpus_per_actor``). ``threads``: ONNX Runtime intra-op threads per
    actor (0 = its default, one per core of the node: set it to cores / actors per node when
    several actors share a node).
    """

    address: str | None = None
    actors: int = 0
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    decode_cpus: float = 1.0  # per decode task
    threads: int = 0
    object_store_memory: int | None = None  # a new local instance only


@dataclass
class EmbedReport:
    """What a run of ``embed_collection`` did, and the set afterwards."""

    out: Path
    engine: str
    model: str
    added: int  # rows written by this run
    errors_added: int
    total: int  # rows in the set
    errors: int
    parts: int
    parts_written: int
    complete: bool
    seconds: float
    skipped: int = 0  # positions already in the set before this run

    @property
    def images_per_s(self) -> float:
        return (self.added + self.errors_added) / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- the Ray engine


def import_ray() -> Any:
    """``ray`` with Ray Data, or RayMissingError saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayMissingError(f"--engine ray needs Ray Data, which is not installed here: {RAY_INSTALL}") from exc
    return ray


def ray_decode(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray Data step 1 (tasks): the driver's rows -> decoded rows; errors stay rows with ``error`` set."""
    n = len(batch["id"])
    files = [str(f) for f in batch["file"]]
    datas = batch["data"]
    readers: list[Callable[[], bytes]] = [
        (lambda f=f: Path(f).read_bytes()) if f else (lambda d=d: bytes(d))  # type: ignore[misc]
        for f, d in zip(files, datas, strict=True)
    ]
    labels = [None if lab is None else str(lab) for lab in batch["label"]]
    chunk = decode_rows([int(i) for i in batch["id"]], [str(p) for p in batch["path"]], labels,
                        [str(x) for x in batch["name"]], readers, size)
    # one output row per input row, in order: the rows, and the errors with zero pixels
    at = {int(i): j for j, i in enumerate(chunk.ids)}
    err = {e[0]: e[2] for e in chunk.errors}
    ids = [int(i) for i in batch["id"]]
    pixels = np.zeros((n, size, size, 3), np.uint8)
    out: dict[str, list[Any]] = {k: [] for k in ("sha1", "size", "width", "height", "error")}
    for r, i in enumerate(ids):
        j = at.get(i)
        if j is None:
            out["sha1"].append("")
            out["size"].append(0)
            out["width"].append(0)
            out["height"].append(0)
            out["error"].append(err[i])
        else:
            pixels[r] = chunk.pixels[j]
            out["sha1"].append(chunk.sha1[j])
            out["size"].append(int(chunk.sizes[j]))
            out["width"].append(int(chunk.widths[j]))
            out["height"].append(int(chunk.heights[j]))
            out["error"].append("")
    return {
        "id": np.asarray(ids, dtype=np.int64), "path": np.asarray([str(p) for p in batch["path"]], dtype=object),
        "label": np.asarray(labels, dtype=object), "sha1": np.asarray(out["sha1"], dtype=object),
        "size": np.asarray(out["size"], dtype=np.int64), "width": np.asarray(out["width"], dtype=np.int32),
        "height": np.asarray(out["height"], dtype=np.int32), "error": np.asarray(out["error"], dtype=object),
        "pixels": pixels,
    }


class RayEmbedder:
    """Ray Data step 2 (an actor pool): one ONNX Runtime session per actor, on its CPU or GPU."""

    def __init__(self, onnx: list[Any], threads: int = 0, gpu: bool = False) -> None:
        """``onnx``: [ObjectRef of the graph's bytes] (in a list, so that Ray hands the ref over, not the bytes)."""
        import tempfile

        import ray

        from ascl.export.runtime import OnnxEmbedder, resolve_providers

        onnx_bytes = ray.get(onnx[0])
        providers = resolve_providers(["cuda", "cpu"]) if gpu else ["CPUExecutionProvider"]
        with tempfile.TemporaryDirectory(prefix="ascl-embed-") as tmp:  # the session keeps the graph in memory
            path = Path(tmp) / "encoder.onnx"
            path.write_bytes(onnx_bytes)
            self.embedder = OnnxEmbedder(path, providers=providers, threads=threads, spinning=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        embeddings = np.zeros((len(ok), self.embedder.embedding_dim), np.float32)
        if ok.any():
            embeddings[ok] = self.embedder.embed(np.ascontiguousarray(pixels[ok]))
        batch["embedding"] = embeddings
        return batch


def _ray_rows(positions: Iterator[tuple[int, SourceImage]], exhausted: threading.Event) -> Iterator[list[dict]]:
    """Windows of driver-side rows: paths for files on disk, encoded bytes for the rest."""
    rows: list[dict[str, Any]] = []
    held = 0
    for i, item in positions:
        if item.file is not None:
            file, data = str(item.file.resolve()), b""
        else:
            file, data = "", item.read()
        rows.append({"id": i, "path": item.path, "label": item.label, "name": item.name or item.path,
                     "file": file, "data": data})
        held += len(data) + 200
        if len(rows) >= RAY_WINDOW_ITEMS or held >= RAY_WINDOW_BYTES:
            yield rows
            rows, held = [], 0
    if rows:
        yield rows
    exhausted.set()


def run_ray(positions: Iterator[tuple[int, SourceImage]], onnx_path: Path, *, image_size: int, batch_size: int,
            options: RayOptions, exhausted: threading.Event) -> Iterator[ResultBatch]:
    """The Ray Data pipeline (Ray must be initialised); yields results in source order."""
    ray = import_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # results come back in source order
    ctx.enable_progress_bars = False  # ours counts images
    ctx.print_on_execution_start = False
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines
    onnx_ref = ray.put(onnx_path.read_bytes())  # once in the object store, fetched by every actor
    actors = options.actors or default_actors(ray, options)
    for rows in _ray_rows(positions, exhausted):
        ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
        ds = ds.map_batches(ray_decode, fn_kwargs={"size": image_size}, batch_size=batch_size,
                            batch_format="numpy", num_cpus=options.decode_cpus)
        ds = ds.map_batches(
            RayEmbedder, fn_constructor_kwargs={"onnx": [onnx_ref], "threads": options.threads,
                                                "gpu": options.num_gpus_per_actor > 0},
            compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, batch_format="numpy",
            num_cpus=options.num_cpus_per_actor, num_gpus=options.num_gpus_per_actor or None)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            yield _ray_result(batch)


def default_actors(ray: Any, options: RayOptions) -> int:
    """The actor pool size when none is asked for: every GPU, else the CPUs left beside one decode task."""
    resources = ray.cluster_resources()
    if options.num_gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) // options.num_gpus_per_actor))
    cpus = float(resources.get("CPU", 1)) - options.decode_cpus
    return max(1, int(cpus // max(options.num_cpus_per_actor, 1e-9)))


def _ray_result(batch: dict[str, np.ndarray]) -> ResultBatch:
    ids = np.asarray(batch["id"], dtype=np.int64)
    errors_text = [str(e) for e in batch["error"]]
    ok = np.asarray([not e for e in errors_text], dtype=bool)
    labels = [None if lab is None else str(lab) for lab in batch["label"]]
    paths = [str(p) for p in batch["path"]]
    start = int(ids[0])
    if not np.array_equal(ids, np.arange(start, start + len(ids))):
        raise RuntimeError("Ray returned rows out of source order (preserve_order is off?)")
    embeddings = np.asarray(batch["embedding"], dtype=np.float32)
    return ResultBatch(
        start, start + len(ids), ids[ok], [p for p, k in zip(paths, ok, strict=True) if k],
        [lab for lab, k in zip(labels, ok, strict=True) if k],
        [str(s) for s, k in zip(batch["sha1"], ok, strict=True) if k], np.asarray(batch["size"])[ok],
        np.asarray(batch["width"])[ok], np.asarray(batch["height"])[ok], embeddings[ok],
        [(int(i), p, e) for i, p, e, k in zip(ids, paths, errors_text, ok, strict=True) if not k])


class ray_session:  # noqa: N801 - a context manager used like a function
    """``ray.init`` unless Ray is initialised already (then it is left running), shut down after."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self.started = False

    def __enter__(self) -> Any:
        ray = import_ray()
        if not ray.is_initialized():
            import logging

            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.WARNING}
            address = self.options.address
            if address in (None, "", "local") and self.options.object_store_memory:
                kwargs["object_store_memory"] = self.options.object_store_memory
            try:
                ray.init(address=address or None, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise EmbeddingSetError(f"could not reach the Ray cluster at {address or '$RAY_ADDRESS'}: {exc}") from exc
            self.started = True
        return ray

    def __exit__(self, *exc: object) -> None:
        if self.started:
            import ray

            ray.shutdown()


# ----------------------------------------------------------------------------- the run


def _positions(items: Iterator[SourceImage], skip: int, last_path: str | None, where: Path
               ) -> Iterator[tuple[int, SourceImage]]:
    """(id, image) from position ``skip`` on, checking that position ``skip - 1`` is still ``last_path``."""
    n = -1
    for n, item in enumerate(items):
        if n < skip:
            if n == skip - 1 and last_path is not None and item.path != last_path:
                raise EmbeddingSetError(
                    f"{where}: the source changed since this set was written (position {n} was {last_path!r}, "
                    f"now {item.path!r}); ids would no longer be stable: embed it into a new --out")
            continue
        yield n, item
    if n + 1 < skip:
        raise EmbeddingSetError(f"{where}: the source now has {n + 1} images but the set holds {skip} positions; "
                                "it changed since the set was written: embed it into a new --out")


def _source_record(parsed: ImageSpec, limit: int | None) -> dict[str, Any]:
    return {"spec": parsed.text, "kind": parsed.kind, "source": parsed.source, "limit": limit}


def _open_set(out: Path, model: dict[str, Any], source: dict[str, Any], rows_per_file: int) -> dict[str, Any]:
    """The manifest to continue from: the existing set's (checked: same model, same source) or a new one."""
    if is_embedding_set(out):
        manifest = read_manifest(out)
        ensure_same_model(manifest.get("model"), model, f"embedding set {out}")
        if manifest["source"]["source"] != source["source"]:
            raise EmbeddingSetError(
                f"{out} holds embeddings of {manifest['source']['spec']!r} ({manifest['source']['source']}), "
                f"not of {source['spec']!r} ({source['source']}); ids are positions in one source: "
                "pass the same source, or write a new set with another --out")
        manifest["source"]["limit"] = source["limit"]
        manifest["max_rows_per_file"] = rows_per_file
        return manifest
    if out.exists() and any(p.name not in (".writer.lock",) for p in out.iterdir()):
        raise EmbeddingSetError(f"{out}: a folder with other files in it, not an embedding set; "
                                "pass a new or empty folder to --out")
    return new_manifest(model, source, rows_per_file)


def embed_collection(
    images: str | os.PathLike[str], out: str | os.PathLike[str], *, model: str | ModelRef | None = None,
    batch_size: int = 256, rows_per_file: int = DEFAULT_ROWS_PER_FILE, limit: int | None = None,
    engine: str = "local", threads: int = 0, decode_workers: int = 0, parallel_batches: int = 0,
    ray: RayOptions | None = None, cache: str | Path | None = None, progress: bool = True,
) -> EmbedReport:
    """Embed every image of ``images`` (any spec of ``ascl.image_sources``) into the set at ``out``.

    ``model``: a spec for ``resolve_model`` (None: the shipped default) or a resolved ref.
    Resumes an existing set of the same model and source (raising ModelMismatchError /
    EmbeddingSetError otherwise). Local engine: ``threads``: ONNX Runtime threads in all (0: one
    per core), shared by ``parallel_batches`` batches embedded at once (0: as many as ``threads``,
    so one intra-op thread each); ``decode_workers``: decode threads (0: as many as cores, at most
    4). ``ray``: the Ray engine's options.
    """
    from ascl.export.cache import cached_onnx
    from ascl.models import ModelRef, resolve_model

    if engine not in ENGINES:
        raise EmbeddingSetError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if batch_size < 1:
        raise EmbeddingSetError(f"--batch-size must be >= 1, got {batch_size}")
    if min(threads, decode_workers, parallel_batches) < 0:
        raise EmbeddingSetError("--threads, --decode-workers and --parallel-batches must be >= 0")
    require_pyarrow()
    if engine == "ray":
        import_ray()  # say what to install before any slow step
    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    onnx_path, _ = cached_onnx(ref, cache=cache)
    identity = model_identity(onnx_path, ref)
    parsed = parse_spec(str(images) if not isinstance(images, ImageSpec) else images)
    source = _source_record(parsed, limit)
    out = Path(out)
    started = time.perf_counter()
    with exclusive(out):
        remove_stale_temporaries(out)
        embedder: OnnxEmbedder | None = None
        if engine == "local" or identity["dim"] is None or identity["image_size"] is None:
            embedder, parallel_batches = local_embedder(onnx_path, threads=threads, parallel_batches=parallel_batches)
            identity["dim"] = identity["dim"] or embedder.embedding_dim
            identity["image_size"] = identity["image_size"] or embedder.image_size
        manifest = _open_set(out, identity, source, rows_per_file)
        writer = SetWriter(out, manifest, rows_per_file, precision=str(identity["precision"]))
        writer.save_manifest()  # the model and source are on record before the first part
        skip = writer.next_id
        last_path = manifest["parts"][-1]["last_path"] if manifest["parts"] else None
        positions = _positions(iter_images(parsed, limit), skip, last_path, out)
        exhausted = threading.Event()
        if engine == "local":
            assert embedder is not None
            results = run_local(positions, embedder, batch_size=batch_size,
                                decode_workers=decode_threads(decode_workers), parallel_batches=parallel_batches,
                                exhausted=exhausted)
        else:
            results = None
        before = (int(manifest["count"]), int(manifest["errors"]))
        from tqdm import tqdm

        with tqdm(desc=f"embedding {parsed.text}", unit="img", initial=skip, total=limit, disable=not progress,
                  file=sys.stderr, smoothing=0.1) as bar:
            if results is not None:
                for batch in results:
                    writer.add(batch)
                    bar.update(batch.end - batch.start)
            else:
                options = ray or RayOptions()
                with ray_session(options):
                    for batch in run_ray(positions, onnx_path, image_size=int(identity["image_size"]),
                                         batch_size=batch_size, options=options, exhausted=exhausted):
                        writer.add(batch)
                        bar.update(batch.end - batch.start)
        writer.finish(exhausted=exhausted.is_set())
    seconds = time.perf_counter() - started
    m = writer.manifest
    return EmbedReport(out, engine, str(identity["name"]), int(m["count"]) - before[0], int(m["errors"]) - before[1],
                       int(m["count"]), int(m["errors"]), len(m["parts"]), writer.committed_now,
                       bool(m["complete"]), seconds, skipped=skip)
