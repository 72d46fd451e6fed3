"""Clients of the served models: ``Client("localhost:8001")`` over gRPC, HTTP optional.

Images go over the wire as their encoded bytes (the server decodes them with the one decode
rule), many per request; results come back as ranked ``Hit`` lists.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ascl import names
from ascl.serving.collections.filters import Where, where_json
from ascl.serving.collections.index import Hit

ImageLike = bytes | str | Path | np.ndarray

__all__ = ["Client", "Hit", "ImageLike", "encode_image"]


def encode_image(image: ImageLike) -> bytes:
    """Encoded bytes for a path, raw bytes, or a uint8 HWC array (PNG-encoded)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file")
        return path.read_bytes()
    if isinstance(image, np.ndarray):
        from PIL import Image

        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] array, got {image.dtype} {list(image.shape)}")
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"cannot send {type(image).__name__} as an image; pass bytes, a path or a uint8 array")


def _chunks(items: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Client:
    """Embedding and image search against a running ``ascl serve``.

    ``url`` is ``host:port`` of the gRPC endpoint (or of HTTP with ``protocol="http"``).
    ``max_batch`` images go in one request (the ensembles' max_batch_size).
    """

    def __init__(self, url: str = "localhost:8001", *, protocol: str = "grpc", timeout_s: float = 60.0,
                 max_batch: int = 64) -> None:
        if protocol == "grpc":
            import tritonclient.grpc as tc
        elif protocol == "http":
            import tritonclient.http as tc  # type: ignore[no-redef]
        else:
            raise ValueError(f"unknown protocol {protocol!r}; use 'grpc' or 'http'")
        self._tc: Any = tc
        self.protocol = protocol
        self.url = url.removeprefix("http://").removeprefix("grpc://")
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self._client = tc.InferenceServerClient(self.url)

    def is_ready(self) -> bool:
        """True when the server answers and every model is ready."""
        try:
            return bool(self._client.is_server_ready())
        except Exception:  # connection refused and the like: the server is not there
            return False

    def _bytes_input(self, batch: Sequence[bytes]) -> Any:
        inp = self._tc.InferInput(names.IMAGE_BYTES, [len(batch), 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b] for b in batch], dtype=np.object_))
        return inp

    def _infer(self, model: str, inputs: list[Any], outputs: list[str]) -> Any:
        wanted = [self._tc.InferRequestedOutput(o) for o in outputs]
        if self.protocol == "grpc":
            return self._client.infer(model, inputs, outputs=wanted, client_timeout=self.timeout_s)
        return self._client.infer(model, inputs, outputs=wanted, timeout=int(self.timeout_s * 1e6))

    def embed(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Unit-norm embeddings float32 [N, D] of ``images``."""
        encoded = [encode_image(i) for i in images]
        if not encoded:
            raise ValueError("embed() needs at least one image")
        parts = [
            self._infer(names.MODEL_EMBED, [self._bytes_input(b)], [names.EMBEDDINGS]).as_numpy(names.EMBEDDINGS)
            for b in _chunks(encoded, self.max_batch)
        ]
        return np.concatenate(parts).astype(np.float32)  # [N, D]

    def search(self, images: Sequence[ImageLike], k: int = 10, where: Where | None = None) -> list[list[Hit]]:
        """The ``k`` nearest gallery entries of each image, best first.

        ``where`` keeps only entries whose metadata pass it, e.g. ``{"label": "cat"}``; several
        fields must all match, a list of values is any of them (``{"label": ["cat", "dog"]}``);
        values compare as text. The filter runs inside the server's FAISS index, so each image
        still gets ``k`` hits when ``k`` entries match (fewer only when fewer match; none: []).
        An unknown field fails the request with a message that lists the known ones.
        """
        encoded = [encode_image(i) for i in images]
        if not encoded:
            raise ValueError("search() needs at least one image")
        where_text = where_json(where)  # FilterError (a ValueError) for a malformed filter, before sending
        results: list[list[Hit]] = []
        for batch in _chunks(encoded, self.max_batch):
            k_in = self._tc.InferInput(names.TOP_K, [len(batch), 1], "INT32")
            k_in.set_data_from_numpy(np.full((len(batch), 1), k, dtype=np.int32))
            inputs = [self._bytes_input(batch), k_in]
            if where_text:  # sent only with a filter: servers without the input keep answering the rest
                where_in = self._tc.InferInput(names.WHERE, [len(batch), 1], "BYTES")
                where_in.set_data_from_numpy(np.full((len(batch), 1), where_text.encode(), dtype=np.object_))
                inputs.append(where_in)
            out = self._infer(names.MODEL_IMAGE_SEARCH, inputs, [names.IDS, names.SCORES, names.METADATA])
            ids, scores, meta = (out.as_numpy(n) for n in (names.IDS, names.SCORES, names.METADATA))  # [B, k]
            results.extend(
                [Hit(int(i), float(s), json.loads(m)) for i, s, m in zip(r_i, r_s, r_m, strict=True) if i >= 0]
                for r_i, r_s, r_m in zip(ids, scores, meta, strict=True)
            )
        return results

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
