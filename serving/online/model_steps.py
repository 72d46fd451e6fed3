"""The steps of the Triton Python models: decode a request's images, embed a dynamic batch,
search it, and keep the index current.

Every Python model of the repository (``templates/``: preprocess, encoder, search and the fused
``image_search`` / ``embed``) is a thin loop over these steps, so the fused hot path and the
chain of separate models answer alike by construction. Nothing here imports Triton
(``triton_python_backend_utils`` exists only inside the stub; ``found_response`` takes it as an
argument, as ``request_errors.error_response`` does): each step takes numpy arrays and returns,
per request, a result or the exception that fails that request alone.

Vendored into the model repository: only numpy, ``ascl`` core, the index interface and
``request_errors`` at import.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ascl.images import decode_image
from ascl.serving.collections.index import (
    IndexSpec,
    VectorIndex,
    limit_search_threads,
    open_index,
    public_metadata,
)
from ascl.serving.online.request_errors import RequestError

# One request's outcome in a batch step: its result, or the exception that fails it alone.
Outcome = Any


def tiny_png() -> bytes:
    """An 8 x 8 grey PNG: the warm-up image of ``initialize`` (Triton 2.51's TYPE_STRING warm-up
    files did not reach the Python models intact), which loads the PIL codecs before the first request."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (127, 127, 127)).save(buf, format="PNG")
    return buf.getvalue()


def request_images(data: np.ndarray, size: int, *, max_image_bytes: int, max_request_bytes: int) -> np.ndarray:
    """One request's encoded images (a BYTES tensor, any shape) -> uint8 [B, size, size, 3].

    RequestError for a request with no image or over ``max_request_bytes`` in all; ImageError
    (naming ``image i``) for an image that does not decode within the limits of ``ascl.images``.
    """
    items = data.reshape(-1)  # [B] bytes
    if len(items) == 0:
        raise RequestError("the request holds no image; send at least one")
    total = sum(len(item) for item in items)
    if total > max_request_bytes:
        raise RequestError(f"the request holds {total / 2**20:.1f} MiB of images, over the "
                           f"{max_request_bytes / 2**20:.0f} MiB limit; send fewer images per request")
    return np.stack([decode_image(bytes(item), size, name=f"image {i}", max_bytes=max_image_bytes)
                     for i, item in enumerate(items)])


def one_k(values: np.ndarray) -> int:
    """The k of a request (one per row, all equal); RequestError when its rows disagree."""
    ks = set(values.reshape(-1).tolist())
    if len(ks) != 1:
        raise RequestError(f"all rows of one request need the same k, got {sorted(ks)}")
    return int(ks.pop())


def one_where(values: np.ndarray | None) -> str | None:
    """A request's metadata filter (JSON text, the same in every row), None when it sent none;
    RequestError when its rows disagree. Parsed, and its size checked, by the index."""
    if values is None:
        return None
    rows = [v if isinstance(v, bytes) else str(v).encode() for v in values.reshape(-1)]  # [B]
    if len(set(rows)) > 1:
        raise RequestError("all rows of one request need the same filter (where)")
    return rows[0].decode("utf-8", errors="replace") if rows else None


def _split(rows: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    if len(sizes) == 1:
        return [rows]
    bounds = np.cumsum([0, *sizes])
    return [rows[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def embed_batches(embed: Callable[[np.ndarray], np.ndarray], batches: Sequence[np.ndarray]) -> list[Outcome]:
    """Embeddings [B_i, D] of each request's images [B_i, S, S, 3]: one call for all of them; when
    that call fails, one call per request, so the request that broke it fails alone."""
    if not batches:
        return []
    try:
        rows = embed(_concat(list(batches)))  # [sum B_i, D]
        return _split(rows, [len(b) for b in batches])
    except Exception:  # find the request that broke the batch: one call each
        outcomes: list[Outcome] = []
        for batch in batches:
            try:
                outcomes.append(embed(batch))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


@dataclass(frozen=True)
class Query:
    """One request's search: its embeddings [B, D], its k and its filter (JSON text or None)."""

    embeddings: np.ndarray
    k: int
    where: str | None = None


@dataclass(frozen=True)
class Found:
    """One request's answer: ids [B, k'] int64, scores [B, k'] float32 (best first), and the
    metadata of each hit as JSON bytes [B, k'] (``{}`` for an id the index no longer holds)."""

    ids: np.ndarray
    scores: np.ndarray
    metadata: np.ndarray


class IndexVersion:
    """One version of the index as the models search it, with the JSON text of each record it has
    returned (encoded once per version, not once per hit: at most ``MAX_ENCODED`` kept), without
    server paths (``public_metadata``: a gallery's name instead of its folder)."""

    MAX_ENCODED = 1 << 16

    def __init__(self, index: VectorIndex) -> None:
        self.index = index
        self._encoded: dict[int, bytes] = {}

    def metadata_json(self, ids: np.ndarray) -> np.ndarray:
        """ids [B, k] -> the records of those ids as JSON bytes [B, k] (``{}`` for an id it does not hold)."""
        keys = ids.reshape(-1).tolist()
        missing = set(keys).difference(self._encoded)
        if missing:
            if len(self._encoded) + len(missing) > self.MAX_ENCODED:
                self._encoded.clear()
                missing = set(keys)
            records = self.index.records(missing)
            for i in missing:
                self._encoded[i] = json.dumps(public_metadata(records.get(i, {})), sort_keys=True).encode()
        meta = np.empty(len(keys), dtype=np.object_)
        meta[:] = [self._encoded[i] for i in keys]
        return meta.reshape(ids.shape)


def search_batches(version: IndexVersion, queries: Sequence[Query]) -> list[Outcome]:
    """``Found`` for each query: one index search per distinct (k, filter) among them.

    A search that raises ValueError (k < 1, a bad filter) or ConnectionError (a remote index that
    cannot be reached) fails every query of its group with that error (they share k and filter);
    anything else is retried one query at a time, so the query that broke it fails alone.
    """
    index = version.index
    outcomes: list[Outcome] = [None] * len(queries)
    groups: dict[tuple[int, str | None], list[int]] = {}
    for i, query in enumerate(queries):
        groups.setdefault((query.k, query.where or None), []).append(i)
    for (k, where), members in groups.items():
        try:
            scores, ids = index.search(_concat([queries[i].embeddings for i in members]), k, where=where)
        except (ValueError, ConnectionError) as exc:  # their own k or filter, or the index is unreachable:
            for i in members:  # the same answer for each of them
                outcomes[i] = exc
            continue
        except Exception:
            for i in members:
                try:
                    outcomes[i] = index.search(queries[i].embeddings, k, where=where)
                except Exception as exc:
                    outcomes[i] = exc
            continue
        sizes = [len(queries[i].embeddings) for i in members]
        for i, s, d in zip(members, _split(scores, sizes), _split(ids, sizes), strict=True):
            outcomes[i] = (s, d)
    return [Found(o[1], o[0], version.metadata_json(o[1])) if isinstance(o, tuple) else o for o in outcomes]


def _concat(rows: list[np.ndarray]) -> np.ndarray:
    return rows[0] if len(rows) == 1 else np.concatenate(rows)


def found_response(pb_utils: Any, found: Found) -> Any:
    """The ``InferenceResponse`` of one request's search (outputs ids, scores, metadata)."""
    from ascl.names import IDS, METADATA, SCORES

    return pb_utils.InferenceResponse([pb_utils.Tensor(IDS, found.ids), pb_utils.Tensor(SCORES, found.scores),
                                       pb_utils.Tensor(METADATA, found.metadata)])


def model_index_spec(value: str, version_folder: Path) -> IndexSpec:
    """A model's ``index_dir`` parameter as a spec: a URI as it is, a folder relative to the
    model's version folder (an absolute path wins in the join)."""
    return value if "://" in value else version_folder / value


class LiveIndex:
    """The index a serving process searches: opened and warmed at start; a watcher thread takes
    each new version (``ascl index add``), warms it and swaps it in.

    Take ``searchable()`` once per batch, so in-flight requests finish on the version they started
    with. A bad new version is logged and skipped; the current one keeps serving. An index whose
    server cannot be reached (a ``ConnectionError``: a remote backend's unavailable error) is
    reported by ``searchable()`` until the watcher has opened it; one that goes away later fails
    the searches themselves, as the backend reports it.
    """

    def __init__(self, spec: IndexSpec, *, poll_s: float = 0.5, log_info: Callable[[str], None] = print,
                 log_warn: Callable[[str], None] = print) -> None:
        limit_search_threads(1)  # small query batches: extra search threads only steal CPU from the encoder
        self._spec = spec
        self._log_info, self._log_warn = log_info, log_warn
        self.current: IndexVersion | None = None
        self._down: str | None = None  # why the index's server cannot be reached, logged once per outage
        self._open()
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="index-watcher", daemon=True)
        self._watcher.start()

    def searchable(self) -> IndexVersion:
        """The version to search now; ConnectionError while the index has never been reachable."""
        current = self.current
        if current is None:
            raise ConnectionError(self._down or "the index has not been opened yet")
        return current

    def _open(self) -> None:
        try:
            index = open_index(self._spec)
            index.warm()  # once per version, not per request
        except ConnectionError as exc:
            self._unreachable(exc)
            return
        self._reachable()
        self.current = IndexVersion(index)

    def _unreachable(self, exc: Exception) -> None:
        if self._down is None:
            self._log_warn(f"{exc}; answering UNAVAILABLE until it is back")
        self._down = str(exc)

    def _reachable(self) -> None:
        if self._down is not None:
            self._log_info("the index is reachable again")
            self._down = None

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            current = self.current
            if current is None:
                self._open()
                continue
            try:
                fresh = current.index.refreshed()
                self._reachable()
                if fresh is not current.index:
                    fresh.warm()
                    self.current = IndexVersion(fresh)  # one reference swap: readers see the old or the new
                    self._log_info(f"loaded index version {fresh.version} ({fresh.count()} vectors)")
            except ConnectionError as exc:
                self._unreachable(exc)
            except Exception as exc:  # a bad new version must not stop serving the current one
                self._log_warn(f"keeping index version {current.index.version}: {exc}")

    def close(self) -> None:
        self._stop.set()
