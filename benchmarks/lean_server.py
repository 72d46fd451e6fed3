"""The lean baseline of ``serve_load.py``: the best single-process image-search server a user could
write in an afternoon, to measure ``ascl serve`` against.

One process, one asyncio loop: a ``grpc.aio`` server speaking the KServe v2 protocol (Triton's
``GRPCInferenceService``: health, readiness and ``ModelInfer`` of ``image_search``, raw tensors as
``tritonclient`` sends them), so the same load client drives it; ONNX Runtime on the same ONNX
file; the same index through the index interface (``open_index``); greedy micro-batching: one
worker per core, each takes every request that queued while it was busy (up to 64 images) and
runs decode (``ascl.images.decode_image``), one ONNX Runtime call (one thread, no spinning) and
one search per distinct k in a thread pool, so ONNX Runtime, FAISS and PIL run outside the GIL
side by side. A bad request fails alone (INVALID_ARGUMENT). No front door, no supervisor, no
limits beyond gRPC's message size: what ``ascl serve`` adds on top is what the comparison prices.

    python benchmarks/lean_server.py --port 9001 --onnx encoder.onnx --index idx   # until SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_BATCH = 64  # images per micro-batch (and per request), as image_search's max_batch_size


@dataclass
class Pending:
    """One request waiting for a worker: its encoded images, its k, and where its answer goes."""

    images: list[bytes]
    k: int
    answer: asyncio.Future[Any] = field(repr=False)


def read_bytes_tensor(raw: bytes) -> list[bytes]:
    """Triton's serialized BYTES tensor: a 4-byte little-endian length before each element."""
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ValueError("malformed BYTES tensor")
        (size,) = struct.unpack_from("<I", raw, at)
        if at + 4 + size > len(raw):
            raise ValueError("malformed BYTES tensor")
        items.append(raw[at + 4:at + 4 + size])
        at += 4 + size
    return items


def write_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


class LeanSearch:
    """Decode, embed and search micro-batches on ``workers`` threads, one ONNX Runtime session each."""

    def __init__(self, onnx_path: str, index_spec: str, workers: int) -> None:
        from ascl.export.runtime import OnnxEmbedder
        from ascl.serving.collections.index import limit_search_threads, open_index

        limit_search_threads(1)
        self.index = open_index(index_spec)
        self.index.warm()
        self.embedders = [OnnxEmbedder(onnx_path, providers=["CPUExecutionProvider"], threads=1, spinning=False)
                          for _ in range(workers)]
        self.size = self.embedders[0].image_size
        for embedder in self.embedders:  # warm-up off the request path
            embedder.embed(np.zeros((8, self.size, self.size, 3), np.uint8))
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.pending: deque[Pending] = deque()
        self.arrived = asyncio.Event()

    def submit(self, item: Pending) -> None:
        self.pending.append(item)
        self.arrived.set()

    async def worker(self, w: int) -> None:
        """Take everything that queued (up to MAX_BATCH images), run it, answer; never wait for more."""
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
            batch = [self.pending.popleft()]
            images = len(batch[0].images)
            while self.pending and images + len(self.pending[0].images) <= MAX_BATCH:
                batch.append(self.pending.popleft())
                images += len(batch[-1].images)
            try:
                outcomes = await loop.run_in_executor(self.pool, self.run, w, batch)
            except Exception as exc:  # the engine failed: this batch fails, the server goes on
                outcomes = [exc] * len(batch)
            for item, outcome in zip(batch, outcomes, strict=True):
                if not item.answer.done():
                    (item.answer.set_exception if isinstance(outcome, Exception) else item.answer.set_result)(outcome)

    def run(self, w: int, batch: list[Pending]) -> list[Any]:
        """(ids, scores, metadata JSON) [B, k'] per request, or the exception that fails it."""
        from ascl.images import decode_image

        outcomes: list[Any] = [None] * len(batch)
        pixels: dict[int, np.ndarray] = {}
        for i, item in enumerate(batch):
            try:
                if not item.images:
                    raise ValueError("the request holds no image")
                pixels[i] = np.stack([decode_image(data, self.size, name=f"image {j}")
                                      for j, data in enumerate(item.images)])
            except ValueError as exc:
                outcomes[i] = exc
        if pixels:
            good = sorted(pixels)
            embeddings = self.embedders[w].embed(np.concatenate([pixels[i] for i in good]))  # [N, D]
            bounds = np.cumsum([0] + [len(pixels[i]) for i in good])
            for k in sorted({batch[i].k for i in good}):
                rows = [n for n, i in enumerate(good) if batch[i].k == k]
                try:
                    scores, ids = self.index.search(np.concatenate([embeddings[bounds[n]:bounds[n + 1]] for n in rows]), k)
                except ValueError as exc:
                    for n in rows:
                        outcomes[good[n]] = exc
                    continue
                records = self.index.records(ids.reshape(-1).tolist())
                at = 0
                for n in rows:
                    count = int(bounds[n + 1] - bounds[n])
                    block = ids[at:at + count]
                    meta = [json.dumps(records.get(int(i), {}), sort_keys=True).encode() for i in block.reshape(-1)]
                    outcomes[good[n]] = (block, scores[at:at + count], meta)
                    at += count
        return outcomes


def servicer(search: LeanSearch) -> Any:
    """The KServe v2 gRPC service: the methods the load client and readiness checks use; the rest
    answer UNIMPLEMENTED (the generated base class)."""
    from tritonclient.grpc import service_pb2_grpc

    class Servicer(Methods, service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        pass

    return Servicer(search)


class Methods:
    def __init__(self, search: LeanSearch) -> None:
        self.search = search

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the protocol's names
        from tritonclient.grpc import service_pb2

        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        from tritonclient.grpc import service_pb2

        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        from tritonclient.grpc import service_pb2

        return service_pb2.ModelReadyResponse(ready=request.name == "image_search")

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        import grpc
        from tritonclient.grpc import service_pb2

        from ascl import names

        try:
            if request.model_name != names.MODEL_IMAGE_SEARCH:
                raise ValueError(f"unknown model {request.model_name!r}; this server has image_search only")
            raw = {inp.name: data for inp, data in zip(request.inputs, request.raw_input_contents, strict=True)}
            images = read_bytes_tensor(raw[names.IMAGE_BYTES])
            k = int(np.frombuffer(raw[names.TOP_K], dtype=np.int32)[0])
            if len(images) > MAX_BATCH:
                raise ValueError(f"at most {MAX_BATCH} images per request")
        except (KeyError, ValueError, IndexError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {exc}")
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.search.submit(Pending(images, k, answer))
        try:
            ids, scores, meta = await answer
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
        shape = list(ids.shape)
        response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, datatype in ((names.IDS, "INT64"), (names.SCORES, "FP32"), (names.METADATA, "BYTES")):
            response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.extend([np.ascontiguousarray(ids, np.int64).tobytes(),
                                             np.ascontiguousarray(scores, np.float32).tobytes(),
                                             write_bytes_tensor(meta)])
        return response


async def serve(port: int, onnx_path: str, index_spec: str, workers: int) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    search = LeanSearch(onnx_path, index_spec, workers)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 2**20), ("grpc.so_reuseport", 0)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer(search), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    tasks = [asyncio.create_task(search.worker(w)) for w in range(workers)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    for task in tasks:
        task.cancel()
    search.pool.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="gRPC port on 127.0.0.1")
    parser.add_argument("--onnx", required=True, help="the exported encoder")
    parser.add_argument("--index", required=True, help="the index (a folder, or a URI of another backend)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="micro-batch workers, one ONNX Runtime session of one thread each (default: one per core)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, str(Path(args.onnx)), args.index, max(1, args.workers)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
