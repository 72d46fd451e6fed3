"""Filtered search in a FAISS index: a metadata filter (``ascl.serving.collections.filters``) inside FAISS.

How it runs (``FieldIndex.search``): the matching entries become an ``IDSelectorBitmap`` over the
index's *internal* positions, and FAISS scores only those. The selector goes to the inner index,
not through the ``IndexIDMap`` wrapper: ``IndexIDMap`` wraps a top-level ``params.sel`` in an
``IDSelectorTranslated`` (external ids), but ``IndexRefine`` (the IVF-PQ factories of ``auto``)
ignores a top-level selector and forwards only ``base_index_params``, whose selector ``IndexIDMap``
does not translate: the filter would silently let other entries through. Labels are translated
back with the id map here, as ``IndexIDMap`` does.

k results at any selectivity (k' = min(k, matching entries) always come back):

- Flat (and any flat-code index): the selector search is exhaustive, so it is exact.
- Small selectivity (at most ``EXACT_MATCHES`` entries, or under ``EXACT_FRACTION`` of the
  index): the matching subset is scored exhaustively on the index's own full-vector storage
  (HNSW's flat storage, IVF-PQ's re-ranking codes), with the same selector; for a plain IVF, all
  lists are probed. Exact, and cheap: one bit test per stored vector, one distance per match.
- Otherwise the approximate index searches with the selector and a wider beam: HNSW's efSearch
  and IVF's nprobe grow as 1 / selectivity. A query row that still comes back with fewer than
  k' results is searched again exhaustively, so no row is ever short.

``FieldIndex`` (field -> value -> internal positions, and the id map) is built once per loaded
index version; ``GalleryIndex`` keeps it until its entries change.

This module imports only numpy, faiss and ``ascl`` core modules: the Triton search model vendors it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ascl.serving.collections.filters import Where, as_text, check_fields, parse_where

EXACT_MATCHES = 1024  # this many matching entries or fewer: score them all
EXACT_FRACTION = 0.05  # a filter keeping less than this share of the index: score the matches all
HNSW_FILTER_EF_MAX = 4096


class _Field:
    """One field's value -> sorted internal positions, as one sorted array and offsets (CSR)."""

    def __init__(self, values: list[str], positions: np.ndarray) -> None:
        codes_of: dict[str, int] = {}
        codes = np.fromiter((codes_of.setdefault(v, len(codes_of)) for v in values), np.int64, len(values))
        order = np.lexsort((positions, codes))  # by value, then position
        self.codes = codes_of
        self.positions = positions[order]
        self.offsets = np.searchsorted(codes[order], np.arange(len(codes_of) + 1))

    def matching(self, values: Iterable[str]) -> np.ndarray:
        parts = [self.positions[self.offsets[c]:self.offsets[c + 1]]
                 for c in (self.codes.get(v) for v in values) if c is not None]
        if not parts:
            return np.zeros(0, np.int64)
        return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))


class FieldIndex:
    """Metadata field -> value -> internal positions of one loaded index version, and filtered search."""

    def __init__(self, index: Any, metadata: Mapping[int, Mapping[str, Any]]) -> None:
        faiss = _faiss()

        self.metadata = metadata
        self.ntotal = int(index.ntotal)
        if hasattr(index, "id_map"):
            self.external = faiss.vector_to_array(index.id_map).astype(np.int64)  # [N] internal -> external id
        else:
            self.external = np.arange(self.ntotal, dtype=np.int64)
        self._order = np.argsort(self.external, kind="stable")
        self._sorted = self.external[self._order]
        self.fields = tuple(sorted({str(f) for record in metadata.values() for f in record}))
        self._fields: dict[str, _Field] = {}
        self._lock = threading.Lock()

    def internal(self, ids: np.ndarray) -> np.ndarray:
        """External ids -> internal positions (ids the index does not hold are dropped)."""
        ids = np.asarray(ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted, ids), max(len(self._sorted) - 1, 0))
        found = (self._sorted[at] == ids) if len(self._sorted) else np.zeros(len(ids), bool)
        return np.asarray(self._order[at[found]], dtype=np.int64)

    def field(self, name: str) -> _Field:
        """The lookup of one field, built on first use and kept for this index version."""
        with self._lock:
            built = self._fields.get(name)
            if built is None:
                pairs = [(i, t) for i, record in self.metadata.items() if (t := as_text(record.get(name))) is not None]
                positions = self.internal(np.array([i for i, _ in pairs], dtype=np.int64))
                if len(positions) != len(pairs):  # metadata of ids the index does not hold: drop those
                    held = set(self.external[positions].tolist())
                    pairs = [(i, t) for i, t in pairs if i in held]
                    positions = self.internal(np.array([i for i, _ in pairs], dtype=np.int64))
                built = self._fields[name] = _Field([t for _, t in pairs], positions)
            return built

    def matching(self, where: Where | str | bytes | None) -> np.ndarray | None:
        """Sorted internal positions that pass the filter, or None for no filter (everything)."""
        parsed = parse_where(where)
        if not parsed:
            return None
        check_fields(parsed, self.fields)
        result: np.ndarray | None = None
        for name, values in sorted(parsed.items(), key=lambda item: len(item[1])):
            found = self.field(name).matching(values)
            result = found if result is None else np.intersect1d(result, found, assume_unique=True)
            if len(result) == 0:
                break
        assert result is not None
        return result

    def search(self, index: Any, queries: np.ndarray, k: int, where: Where | str | bytes | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> (scores [Q, k'], external ids [Q, k']) among the entries passing ``where``.

        k' = min(k, matches): every row is full (see the module docstring); no match gives [Q, 0].
        """
        faiss = _faiss()

        match = self.matching(where)
        q = len(queries)
        if match is None:
            scores, labels = index.search(queries, min(k, self.ntotal))
            return scores.astype(np.float32), labels.astype(np.int64)
        kk = min(k, len(match))
        if kk == 0:
            return np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
        mask = np.zeros(self.ntotal, dtype=bool)
        mask[match] = True
        bits = np.packbits(mask, bitorder="little")  # bit i of byte i >> 3 = internal position i
        sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
        inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
        fraction = len(match) / max(self.ntotal, 1)
        exact = len(match) <= EXACT_MATCHES or fraction < EXACT_FRACTION
        scores, labels = _search(inner, queries, kk, sel, fraction, exact)
        short = (labels >= 0).sum(axis=1) < kk
        if short.any():  # an approximate search fell short: those rows again, exhaustively
            scores[short], labels[short] = _search(inner, queries[short], kk, sel, fraction, True)
        ids = np.where(labels >= 0, self.external[np.maximum(labels, 0)], -1)
        del bits  # the selector read it until here
        return scores.astype(np.float32), ids.astype(np.int64)


def _faiss() -> Any:
    """The faiss module, untyped: its stubs do not know the keyword constructors of the SearchParameters."""
    import faiss

    return faiss


def _search(inner: Any, queries: np.ndarray, k: int, sel: Any, fraction: float, exact: bool
            ) -> tuple[np.ndarray, np.ndarray]:
    """One filtered search of ``inner`` (internal positions); ``exact`` scores every match."""
    faiss = _faiss()

    storage = _exhaustive_storage(inner) if exact else None
    if storage is not None:
        params = faiss.SearchParameters(sel=sel)
        scores, labels = storage.search(queries, k, params=params)
        return scores, labels
    if isinstance(inner, faiss.IndexRefine):
        base = faiss.downcast_index(inner.base_index)
        base_params = _params(base, sel, fraction, exact, math.ceil(k * inner.k_factor))
        params = faiss.IndexRefineSearchParameters(k_factor=float(inner.k_factor), base_index_params=base_params)
    else:
        base_params = None
        params = _params(inner, sel, fraction, exact, k)
    scores, labels = inner.search(queries, k, params=params)
    del base_params  # kept alive for the search above
    return scores, labels


def _exhaustive_storage(inner: Any) -> Any:
    """A flat-code index over the same internal positions that scores every selected entry, or None."""
    faiss = _faiss()

    if isinstance(inner, faiss.IndexFlatCodes):
        return inner
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.downcast_index(inner.storage)
    if isinstance(inner, faiss.IndexRefine):
        refine = faiss.downcast_index(inner.refine_index)
        return refine if isinstance(refine, faiss.IndexFlatCodes) else None
    return None


def _params(index: Any, sel: Any, fraction: float, exact: bool, k: int) -> Any:
    """Search parameters carrying ``sel``, with the beam widened for the filter's selectivity."""
    faiss = _faiss()

    ivf = faiss.try_extract_index_ivf(index)
    if isinstance(index, faiss.IndexHNSW):
        ef = max(int(index.hnsw.efSearch), k)
        return faiss.SearchParametersHNSW(sel=sel, efSearch=max(k, min(HNSW_FILTER_EF_MAX, math.ceil(ef / fraction))))
    if ivf is not None:
        nprobe = ivf.nlist if exact else min(ivf.nlist, math.ceil(ivf.nprobe / fraction))
        return faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe))
    return faiss.SearchParameters(sel=sel)
