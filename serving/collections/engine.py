"""The one batch-embedding loop: images of any source -> unit embeddings, in source order.

``run_local`` reads, hashes and decodes batches on a thread pool (PIL decodes and resizes
without the GIL) that feeds whole batches through a bounded queue, while ONNX Runtime embeds
the previous ones; results come back in source order. Index building (``build``), dedup,
``ascl embed`` (``embed``, its local engine) and the in-process gallery (``changes.embed_encoded``)
all go through it; ``embed_all`` collects its results for the first two. What an image that
cannot be read becomes (a warning, an error row, an ImageError) is the caller's; which images to
leave out before they are decoded is a parameter (``skip``: index building leaves out the images
the index holds already). ``decode_rows`` is also the Ray engine's decode step.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ascl.image_sources import SourceImage
from ascl.images import ImageError, decode_image_sized
from ascl.serving.collections.parquet_set import ResultBatch

if TYPE_CHECKING:
    from ascl.export.runtime import OnnxEmbedder

__all__ = ["Collected", "DecodedChunk", "Skip", "decode_rows", "decode_threads", "embed_all", "local_embedder",
           "run_local"]

Skip = Callable[[str, str], bool]  # (path, sha1 of the bytes) -> True: leave this image out, undecoded


# ----------------------------------------------------------------------------- decoding (both engines)


@dataclass
class DecodedChunk:
    """Consecutive source positions [start, end), decoded: rows with pixels [N, S, S, 3], and errors."""

    start: int
    end: int
    ids: np.ndarray
    pixels: np.ndarray
    paths: list[str]
    labels: list[str | None]
    sha1: list[str]
    sizes: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    skipped: int = 0  # positions the skip rule left out

    def with_embeddings(self, embeddings: np.ndarray) -> ResultBatch:
        return ResultBatch(self.start, self.end, self.ids, self.paths, self.labels, self.sha1, self.sizes,
                           self.widths, self.heights, embeddings, self.errors, self.skipped)


def decode_rows(ids: Sequence[int], paths: Sequence[str], labels: Sequence[str | None], names: Sequence[str],
                readers: Sequence[Callable[[], bytes]], size: int, skip: Skip | None = None) -> DecodedChunk:
    """Read, hash and decode consecutive positions: the one decode step of both engines.

    A file that cannot be read or decoded becomes an error (its ImageError message), not a row;
    one that ``skip`` leaves out (after hashing, before decoding) becomes neither.
    """
    keep: list[int] = []
    pixels: list[np.ndarray] = []
    sha1: list[str] = []
    sizes: list[int] = []
    dims: list[tuple[int, int]] = []
    errors: list[tuple[int, str, str]] = []
    skipped = 0
    for j, read in enumerate(readers):
        try:
            try:
                data = read()
            except OSError as exc:
                raise ImageError(f"{names[j]}: cannot read file ({exc.strerror or exc})") from exc
            key = hashlib.sha1(data).hexdigest()
            if skip is not None and skip(paths[j], key):
                skipped += 1
                continue
            array, wh = decode_image_sized(data, size, name=names[j])
        except ImageError as exc:
            errors.append((int(ids[j]), paths[j], exc.message))
            continue
        keep.append(j)
        pixels.append(array)
        sha1.append(key)
        sizes.append(len(data))
        dims.append(wh)
    start = int(ids[0]) if len(ids) else 0
    wh_arr = np.asarray(dims, dtype=np.int32).reshape(-1, 2)
    return DecodedChunk(
        start, start + len(ids), np.asarray([ids[j] for j in keep], dtype=np.int64),
        np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
        [paths[j] for j in keep], [labels[j] for j in keep], sha1, np.asarray(sizes, dtype=np.int64),
        wh_arr[:, 0].copy(), wh_arr[:, 1].copy(), errors, skipped)


def _decode_items(chunk: list[tuple[int, SourceImage]], size: int, skip: Skip | None = None) -> DecodedChunk:
    return decode_rows([i for i, _ in chunk], [it.path for _, it in chunk], [it.label for _, it in chunk],
                       [it.name or it.path for _, it in chunk], [it.read for _, it in chunk], size, skip)


def _embedded(embedder: OnnxEmbedder, decoded: DecodedChunk) -> ResultBatch:
    if not len(decoded.ids):
        return decoded.with_embeddings(np.zeros((0, embedder.embedding_dim), np.float32))
    return decoded.with_embeddings(embedder.embed(decoded.pixels))


# ----------------------------------------------------------------------------- the local engine


_DONE = object()


def run_local(positions: Iterable[tuple[int, SourceImage]], embedder: OnnxEmbedder, *, batch_size: int,
              decode_workers: int, parallel_batches: int = 1, exhausted: threading.Event | None = None,
              skip: Skip | None = None) -> Iterator[ResultBatch]:
    """Decode on ``decode_workers`` threads ahead of ONNX Runtime; yields results in source order.

    ``decode_workers=0``: everything in the caller's thread, batch after batch (a query or an
    upload: one small batch needs no pipeline). ``skip``: see ``decode_rows``.

    A producer thread walks the source and submits one decode task per batch; at most
    ``2 * decode_workers + 1`` batches wait decoded or in decoding (bounded memory).
    ``parallel_batches`` batches are embedded at once, each on its own thread through the one
    session (ONNX Runtime runs concurrent calls; with one intra-op thread per call the cores never
    wait for each other at an operator's barrier, so a decoder or a neighbour process taking a
    core slows one batch instead of stalling all). Sets ``exhausted`` when the source came to its end.
    """
    size = embedder.image_size
    exhausted = exhausted if exhausted is not None else threading.Event()
    if decode_workers == 0:
        for chunk in _chunks(positions, batch_size):
            yield _embedded(embedder, _decode_items(chunk, size, skip))
        exhausted.set()
        return
    pending: queue.Queue[Any] = queue.Queue(maxsize=2 * decode_workers + 1)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                pending.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce(pool: ThreadPoolExecutor) -> None:
        try:
            chunk: list[tuple[int, SourceImage]] = []
            for position in positions:
                chunk.append(position)
                if len(chunk) == batch_size:
                    if not put(pool.submit(_decode_items, chunk, size, skip)):
                        return
                    chunk = []
            if chunk and not put(pool.submit(_decode_items, chunk, size, skip)):
                return
            exhausted.set()
            put(_DONE)
        except BaseException as exc:  # the source failed: hand it to the consumer
            put(exc)

    def embed(decoded: DecodedChunk) -> ResultBatch:
        return _embedded(embedder, decoded)

    with ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="ascl-decode") as pool, \
            ThreadPoolExecutor(max_workers=parallel_batches, thread_name_prefix="ascl-embed") as infer:
        producer = threading.Thread(target=produce, args=(pool,), name="ascl-source", daemon=True)
        producer.start()
        inflight: deque[Future[ResultBatch]] = deque()
        try:
            while True:
                item = pending.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                inflight.append(infer.submit(embed, item.result()))
                if len(inflight) >= parallel_batches:
                    yield inflight.popleft().result()  # in source order; the others keep embedding meanwhile
            while inflight:
                yield inflight.popleft().result()
        finally:
            stop.set()
            for future in inflight:
                future.cancel()
            producer.join(timeout=10)


def _chunks(positions: Iterable[tuple[int, SourceImage]], size: int) -> Iterator[list[tuple[int, SourceImage]]]:
    chunk: list[tuple[int, SourceImage]] = []
    for position in positions:
        chunk.append(position)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def local_embedder(onnx_path: str | Path, *, threads: int = 0, parallel_batches: int = 0) -> tuple[OnnxEmbedder, int]:
    """(an ONNX Runtime session for ``run_local``, the batches it embeds at once).

    ``threads``: ONNX Runtime threads in all (0: one per core), shared by ``parallel_batches``
    batches at once (0: as many as ``threads``, one intra-op thread each). No worker spinning:
    idle ONNX Runtime threads would busy-wait on the cores the decoders need.
    """
    from ascl.export.runtime import OnnxEmbedder

    threads = threads or len(os.sched_getaffinity(0))
    parallel_batches = parallel_batches or threads
    return OnnxEmbedder(onnx_path, threads=max(1, threads // parallel_batches), spinning=False), parallel_batches


def decode_threads(decode_workers: int = 0) -> int:
    """Decode threads of the local engine: ``decode_workers``, else one per core, at most 4."""
    return decode_workers or min(4, len(os.sched_getaffinity(0)))


@dataclass
class Collected:
    """What ``embed_all`` embedded, in source order: vectors [N, D] and one record each."""

    vectors: np.ndarray
    records: list[dict[str, Any]]  # path, label, size, sha1, source
    bad: int = 0  # images that could not be read or decoded (each one warned about)
    skipped: int = 0  # images the skip rule left out


def embed_all(items: Iterable[SourceImage], onnx_path: str | Path, *, batch_size: int = 256,
              skip: Skip | None = None, progress: bool = True, desc: str = "embedding", total: int | None = None,
              warn: Callable[[str], None] | None = None) -> Collected:
    """Every image of ``items`` through ``run_local``, collected: the loop of index building and dedup.

    An image that cannot be read or decoded is left out with ``warning: skipping <why>`` (through
    ``warn``, default stderr), so one bad file in a gallery folder never stops a build.
    """
    from tqdm import tqdm

    warn = warn or _say
    embedder, parallel = local_embedder(onnx_path)
    sources: list[str] = []

    def positions() -> Iterator[tuple[int, SourceImage]]:
        for i, item in enumerate(items):
            if not sources:
                sources.append(item.source)  # one source per iteration of ascl.image_sources
            yield i, item

    vectors: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    bad = skipped = 0
    with tqdm(desc=desc, unit="img", disable=not progress, total=total, file=sys.stderr) as bar:
        for batch in run_local(positions(), embedder, batch_size=batch_size, decode_workers=decode_threads(),
                               parallel_batches=parallel, skip=skip):
            for _, _, message in batch.errors:
                warn(f"warning: skipping {message}")
            bad += len(batch.errors)
            skipped += batch.skipped
            vectors.append(batch.embeddings)  # [B, D]
            records.extend({"path": path, "label": label, "size": int(size), "source": sources[0], "sha1": key}
                           for path, label, size, key in zip(batch.paths, batch.labels, batch.sizes.tolist(),
                                                             batch.sha1, strict=True))
            bar.update(batch.end - batch.start)
    dim = embedder.embedding_dim
    return Collected(np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32), records, bad, skipped)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
