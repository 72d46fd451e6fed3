"""The Milvus index backend: a collection of a Milvus server (or a Milvus Lite file) behind the index interface.

Specs: ``milvus://HOST:PORT/COLLECTION`` (a standalone server or a cluster's proxy; a token, when
the server asks for one, from ``$ASCL_MILVUS_TOKEN``: ``user:password`` or an API key) and
``milvus+lite:///PATH.db#COLLECTION`` (a local file through ``milvus-lite``, for development).
One ``MilvusClient`` code path serves both. The client (``pymilvus``) is imported on first use:
``pip install 'ascl-hub[milvus]'``.

A collection holds one entity per gallery entry:

    id      INT64 primary key (ours: never reused, one per content key, as in every backend)
    vector  FLOAT_VECTOR [dim], unit norm; inner product (FLAT, HNSW or IVF_SQ8 by size)
    sha1    VARCHAR: the content key ("" when the record has none)
    path, label  VARCHAR: for people who read the collection with other tools ("" when none)
    record  JSON: the metadata record as written (what ``records`` and hits return)
    fields  JSON: field -> the value as a filter compares it (``filters.as_text``), so that a
            ``where`` filter becomes a Milvus boolean expression over ``fields["name"]`` with
            the same meaning as in FAISS (``filter_expression``: every name and value a
            JSON-escaped string literal, never expression syntax)

and two collection properties: ``ascl.index`` (the version record: version, dim, count,
next id, index type, the metadata fields held and the model identity, checked like a FAISS
manifest's) and ``ascl.writer`` (the writer lease).

Writers take turns through the lease (``writer_lease``: Fischer's timed mutual exclusion on the
property, renewed while held, expiring ``LEASE_S`` after a writer died). A ``writing`` block
buffers its changes and applies them when it ends (inserts, deletes, then the new version
record), so a block that raises writes nothing. Milvus has no transactions: a writer that dies
while it applies a change can leave part of it; re-running the change completes it (the same
content keeps its id).

Readers search the collection as it is now. Searches use the ``Session`` consistency level: a
process sees its own writes at once, and other processes' within Milvus's time tick (about a
second), which is how several serving replicas see one writer's images without a restart.
``count``, ``version`` and ``model`` are those of the version record the object was opened with
(``refreshed`` reads it again, cheaply).

Only numpy and ``ascl`` core at import (pymilvus on first use): the Triton search model vendors it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ascl.errors import AsclError
from ascl.serving.collections.filters import Parsed, Where, as_text, check_fields, parse_where
from ascl.serving.collections.index_types import (
    FLAT_MAX,
    HNSW_MAX,
    Hit,
    IndexBusyError,
    IndexFileError,
    IndexSpec,
    IndexUnavailableError,
    NewIndex,
    one_id_per_content,
)

SCHEMES = ("milvus", "milvus+lite")
FORMAT = 1
INDEX_KEY = "ascl.index"  # collection property: the version record (JSON)
WRITER_KEY = "ascl.writer"  # collection property: the writer lease (JSON; "{}" when free)
TOKEN_ENV = "ASCL_MILVUS_TOKEN"
CONNECT_TIMEOUT_S = 5.0  # an unreachable server is an error within seconds, not a hang
CALL_TIMEOUT_S = 10.0  # one search or query (a server that went away: UNAVAILABLE after this at most)
WRITE_TIMEOUT_S = 120.0  # one insert batch or collection change
LEASE_S = 60.0  # a writer's lease; renewed every LEASE_S / 4 while it writes
LEASE_SETTLE_S = 0.5  # Fischer's delay: longer than any writer's read-then-write of the lease
WAIT_S = 300.0  # how long a writer waits for another, as for a FAISS folder
MAX_TOPK = 16384  # Milvus's largest limit per search
PAGE = 16384  # ids per query page (Milvus returns at most 16384 rows per query)
INSERT_BYTES = 8 * 2**20  # rows per insert call: about this many bytes of vectors
EXACT_MATCHES_MAX = 200_000  # a short filtered row is re-scored exactly from at most this many matches
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 128
IVF_NPROBE = 64
VARCHAR_MAX = 65535
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8")


@dataclass(frozen=True)
class MilvusSpec:
    """Where a Milvus index lives: the client's URI, the collection and the spec as the user wrote it."""

    uri: str
    collection: str
    text: str

    @property
    def lite(self) -> bool:
        return not self.uri.startswith("http")


def parse_spec(spec: IndexSpec) -> MilvusSpec:
    """``milvus://HOST:PORT/COLLECTION`` or ``milvus+lite:///PATH.db#COLLECTION``; IndexFileError otherwise."""
    text = str(spec)
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    if scheme == "milvus":
        address, _, collection = rest.partition("/")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not collection:
            raise IndexFileError(f"{text}: a Milvus index is milvus://HOST:PORT/COLLECTION, e.g. "
                                 "milvus://127.0.0.1:19530/gallery")
        uri = f"http://{address}"
    elif scheme == "milvus+lite":
        path, _, collection = rest.partition("#")
        if not path or not collection:
            raise IndexFileError(f"{text}: a Milvus Lite index is milvus+lite:///PATH.db#COLLECTION, e.g. "
                                 "milvus+lite:///data/gallery.db#gallery")
        uri = str(Path(path).expanduser().absolute())
    else:
        raise IndexFileError(f"{text}: not a Milvus index spec")
    if not NAME.match(collection):
        raise IndexFileError(f"{text}: {collection!r} is not a Milvus collection name (letters, digits and "
                             "underscores, not starting with a digit, at most 255)")
    return MilvusSpec(uri, collection, text)


# ---------------------------------------------------------------------------------------- the client

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as exc:
        raise IndexFileError("a Milvus index needs the Milvus client: pip install 'ascl-hub[milvus]' "
                             f"({exc})") from None
    return pymilvus


def client(spec: MilvusSpec) -> Any:
    """The process's ``MilvusClient`` for ``spec``'s server (IndexUnavailableError within seconds when unreachable)."""
    with _clients_lock:
        found = _clients.get(spec.uri)
        if found is not None:
            return found
        pymilvus = _pymilvus()
        if spec.lite:
            Path(spec.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            made = pymilvus.MilvusClient(uri=spec.uri, token=os.environ.get(TOKEN_ENV, ""), timeout=CONNECT_TIMEOUT_S,
                                           dedicated=True)
        except Exception as exc:
            raise _unavailable(spec, exc) from None
        _clients[spec.uri] = made
        return made


def forget(spec: MilvusSpec) -> None:
    """Drop the process's client of ``spec``'s server (after it went away)."""
    with _clients_lock:
        old = _clients.pop(spec.uri, None)
    if old is not None:
        with contextlib.suppress(Exception):
            old.close()


def _unavailable(spec: MilvusSpec, exc: BaseException) -> IndexUnavailableError:
    where = spec.uri if spec.lite else spec.uri.removeprefix("http://")
    return IndexUnavailableError(f"{spec.text}: Milvus at {where} is unreachable ({_reason(exc)}); start it, or "
                                 "check the address and the network")


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _is_connection_error(exc: BaseException) -> bool:
    """A failure to reach the server (as opposed to a request it refused)."""
    code = getattr(exc, "code", None)
    name = type(exc).__name__
    text = str(exc).lower()
    if name in ("MilvusUnavailableException", "_InactiveRpcError", "FutureTimeoutError", "TimeoutError"):
        return True
    if isinstance(code, int) and code in (1, 2):  # pymilvus: unexpected error / connect failed
        return True
    # "collection not loaded": a server that just restarted and has not loaded it again yet
    return any(s in text for s in ("unavailable", "deadline", "fail connecting", "connection refused",
                                   "failed to connect", "socket closed", "timeout", "timed out",
                                   "collection not loaded"))


def call(spec: MilvusSpec, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One client call: IndexUnavailableError when the server cannot be reached, IndexFileError when it
    refuses the request (with its reason)."""
    try:
        return fn(*args, **kwargs)
    except (AsclError, ValueError, TypeError):
        raise
    except Exception as exc:
        if _is_connection_error(exc):
            forget(spec)  # the next call connects afresh (a channel's reconnect back-off can grow to minutes)
            raise _unavailable(spec, exc) from None
        raise IndexFileError(f"{spec.text}: Milvus refused to {what}: {_reason(exc)}") from None


# ---------------------------------------------------------------------------------------- filters

def literal(text: str) -> str:
    """``text`` as a Milvus string literal: JSON-escaped (quotes, backslashes, control characters),
    so that nothing in it is ever read as expression syntax."""
    return json.dumps(text, ensure_ascii=False)


def filter_expression(parsed: Parsed) -> str:
    """A parsed filter (``filters.parse_where``) as a Milvus boolean expression over the ``fields`` JSON:
    values of one field OR, fields AND, every name and value a string literal (``literal``)."""
    terms = []
    for name, values in sorted(parsed.items()):
        field = f"fields[{literal(name)}]"
        ors = " or ".join(f"{field} == {literal(v)}" for v in values)
        terms.append(f"({ors})" if len(values) != 1 else ors)
    return " and ".join(terms)


def filter_fields(record: Mapping[str, Any]) -> dict[str, str]:
    """The ``fields`` JSON of one record: each field a filter can match, as the text it compares as."""
    return {str(k): t for k, v in record.items() if (t := as_text(v)) is not None}


# ---------------------------------------------------------------------------------------- index types

def auto_index_type(n: int) -> str:
    """The index type ``auto`` picks for ``n`` vectors (the sizes of every backend's ``auto``)."""
    if n < FLAT_MAX:
        return "FLAT"
    if n < HNSW_MAX:
        return f"HNSW{HNSW_M}"
    return "IVF_SQ8"


def index_params(factory: str, n: int) -> tuple[str, dict[str, Any]]:
    """(Milvus index type, its build parameters) for a ``--factory`` value; IndexFileError for an unknown one."""
    name = factory.strip().upper()
    if name == "AUTO":
        name = auto_index_type(n)
    if name == "FLAT":
        return "FLAT", {}
    if name.startswith("HNSW") and (name[4:] == "" or name[4:].isdigit()):
        return "HNSW", {"M": int(name[4:] or HNSW_M), "efConstruction": HNSW_EF_CONSTRUCTION}
    if name in ("IVF_FLAT", "IVF_SQ8"):
        nlist = int(min(65536, max(128, 4 * math.sqrt(max(n, 1)))))
        return name, {"nlist": nlist}
    raise IndexFileError(f"unknown Milvus index type {factory!r}; choose auto (FLAT below 50k vectors, HNSW32 "
                         f"below 300k, IVF_SQ8 above), FLAT, HNSW or HNSW<M>, IVF_FLAT or IVF_SQ8")


def search_params(index_type: str, k: int) -> dict[str, Any]:
    """Query-time knobs of every reader: HNSW's ef, IVF's nprobe (inner product always)."""
    params: dict[str, Any] = {}
    if index_type == "HNSW":
        params["ef"] = max(HNSW_EF_SEARCH, k)
    elif index_type.startswith("IVF"):
        params["nprobe"] = IVF_NPROBE
    return {"metric_type": "IP", "params": params}


# ---------------------------------------------------------------------------------------- the index

def not_an_index(spec: MilvusSpec) -> IndexFileError:
    return IndexFileError(f"{spec.text}: no such index (collection {spec.collection!r} holds no ascl index); "
                          "create one with 'ascl index build'")


def read_record(spec: MilvusSpec) -> dict[str, Any] | None:
    """The collection's version record, or None when there is no such collection (or it holds no index)."""
    c = client(spec)
    if not call(spec, "look the collection up", c.has_collection, spec.collection, timeout=CALL_TIMEOUT_S):
        return None
    described = call(spec, "describe the collection", c.describe_collection, spec.collection, timeout=CALL_TIMEOUT_S)
    text = (described.get("properties") or {}).get(INDEX_KEY)
    if not text:
        return None
    try:
        record: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IndexFileError(f"{spec.text}: unreadable index record ({exc})") from exc
    if record.get("format") != FORMAT:
        raise IndexFileError(f"{spec.text}: unknown index format {record.get('format')!r} (expected {FORMAT})")
    return record


class MilvusIndex:
    """A Milvus collection as a ``VectorIndex``: searches go to the server; ``count``, ``version`` and
    ``model`` are the version record's. A writer's object (``writing``) buffers its changes."""

    def __init__(self, spec: MilvusSpec, record: dict[str, Any], *, writer: bool = False) -> None:
        self.spec = spec
        self.record = record
        self.writer = writer
        self.consistency = "Strong" if writer else "Session"
        self._adds: dict[int, dict[str, Any]] = {}  # id -> row, buffered by a writer
        self._removes: set[int] = set()
        self.changed = False

    # -- what it records
    @property
    def dim(self) -> int:
        return int(self.record["dim"])

    @property
    def version(self) -> int:
        return int(self.record["version"])

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.record.get("model") or {})

    @property
    def index_type(self) -> str:
        return str(self.record.get("index_type", "FLAT"))

    def info(self) -> dict[str, Any]:
        return {**self.record, "backend": "milvus", "spec": self.spec.text}

    def count(self) -> int:
        return int(self.record["count"])

    def refreshed(self) -> MilvusIndex:
        record = read_record(self.spec)
        if record is None or int(record["version"]) == self.version:
            return self
        return MilvusIndex(self.spec, record)

    def warm(self) -> None:
        ensure_loaded(self.spec)

    # -- reads
    def check_where(self, where: Where | str | bytes | None) -> None:
        parsed = parse_where(where)
        if parsed:
            check_fields(parsed, self.record.get("fields", ()))

    def _query(self, expr: str, fields: list[str], limit: int | None = None) -> list[dict[str, Any]]:
        c = client(self.spec)
        kwargs: dict[str, Any] = {"limit": limit} if limit is not None else {}
        rows = call(self.spec, "query", c.query, self.spec.collection, filter=expr, output_fields=fields,
                    consistency_level=self.consistency, timeout=CALL_TIMEOUT_S, **kwargs)
        return list(rows)

    def _pages(self, fields: list[str], expr: str = "") -> Iterator[dict[str, Any]]:
        """Every committed entity (id ranges of ``PAGE``: Milvus answers at most that many rows a query)."""
        top = int(self.record.get("next_id", 0))
        for start in range(0, top, PAGE):
            where = f"id >= {start} and id < {start + PAGE}" + (f" and ({expr})" if expr else "")
            yield from self._query(where, fields, limit=PAGE)

    def _committed(self, ids: Iterable[int], fields: list[str]) -> list[dict[str, Any]]:
        wanted = sorted({int(i) for i in ids} - self._removes)
        rows: list[dict[str, Any]] = []
        for start in range(0, len(wanted), PAGE):
            chunk = ",".join(str(i) for i in wanted[start:start + PAGE])
            rows.extend(self._query(f"id in [{chunk}]", fields, limit=PAGE))
        return rows

    def records(self, ids: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
        if ids is None:
            rows = [r for r in self._pages(["id", "record"]) if int(r["id"]) not in self._removes]
            pending = dict(self._adds)
        else:
            wanted = {int(i) for i in ids}
            rows = self._committed(wanted - set(self._adds), ["id", "record"])
            pending = {i: row for i, row in self._adds.items() if i in wanted}
        found = {int(r["id"]): {"id": int(r["id"]), **(r.get("record") or {})} for r in rows}
        found.update({i: {"id": i, **row["record"]} for i, row in pending.items()})
        return found

    def known_keys(self) -> set[str]:
        keys = {str(r["sha1"]) for r in self._pages(["id", "sha1"]) if r.get("sha1") and int(r["id"]) not in self._removes}
        return keys | {row["sha1"] for row in self._adds.values() if row["sha1"]}

    def _held_keys(self, keys: Sequence[str]) -> dict[str, int]:
        """content key -> id, for those of ``keys`` the index holds (committed or buffered)."""
        held: dict[str, int] = {}
        unique = sorted(set(keys))
        for start in range(0, len(unique), 1024):
            chunk = ", ".join(literal(k) for k in unique[start:start + 1024])
            for r in self._query(f"sha1 in [{chunk}]", ["id", "sha1"], limit=PAGE):
                if int(r["id"]) not in self._removes:
                    held.setdefault(str(r["sha1"]), int(r["id"]))
        held.update({row["sha1"]: i for i, row in self._adds.items() if row["sha1"]})
        return held

    def reconstruct(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [N, D] as stored, their ids [N]): Milvus keeps every vector whole, whatever the index type."""
        rows = [r for r in self._pages(["id", "vector"]) if int(r["id"]) not in self._removes]
        rows += [{"id": i, "vector": row["vector"]} for i, row in self._adds.items()]
        ids = np.array([int(r["id"]) for r in rows], dtype=np.int64)  # [N]
        vectors = np.array([r["vector"] for r in rows], dtype=np.float32).reshape(len(rows), self.dim)  # [N, D]
        return vectors, ids

    def _count_matching(self, expr: str) -> int:
        rows = self._query(expr, ["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def search(self, queries: np.ndarray, k: int, where: Where | str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> (scores [Q, k'] float32, ids [Q, k'] int64), best first, k' = min(k, matches).

        The filter runs inside Milvus (``filter_expression``). A row that Milvus answers with fewer
        hits than the entries that match (an approximate index under a narrow filter) is scored
        again exactly over the matching vectors, so no row is short.
        """
        if k <= 0:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected embeddings of shape [N, {self.dim}], got {list(queries.shape)}")
        parsed = parse_where(where)
        q = len(queries)
        limit = min(k, MAX_TOPK, self.count())
        if limit == 0 or q == 0:
            return np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
        if parsed:
            check_fields(parsed, self.record.get("fields", ()))
        expr = filter_expression(parsed)
        c = client(self.spec)
        answer = call(self.spec, "search", c.search, self.spec.collection, data=queries.tolist(), limit=limit,
                      filter=expr, search_params=search_params(self.index_type, limit), output_fields=[],
                      consistency_level=self.consistency, timeout=CALL_TIMEOUT_S)
        rows = [[(float(h["distance"]), int(h["id"])) for h in row] for row in answer]
        longest = max(len(r) for r in rows)
        if longest < limit:  # fewer than k came back: how many match?
            longest = min(limit, self._count_matching(expr or "id >= 0"))
        short = [j for j, r in enumerate(rows) if len(r) < longest]
        if short:
            for j, row in zip(short, self._exact(queries[short], longest, expr), strict=True):
                rows[j] = row
        scores = np.array([[s for s, _ in r[:longest]] for r in rows], dtype=np.float32).reshape(q, longest)
        ids = np.array([[i for _, i in r[:longest]] for r in rows], dtype=np.int64).reshape(q, longest)
        return scores, ids

    def _exact(self, queries: np.ndarray, k: int, expr: str) -> list[list[tuple[float, int]]]:
        """The top ``k`` of each query among the entities passing ``expr``, scored here over their vectors."""
        if self._count_matching(expr or "id >= 0") > EXACT_MATCHES_MAX:
            raise IndexFileError(f"{self.spec.text}: Milvus returned fewer hits than match this filter, and over "
                                 f"{EXACT_MATCHES_MAX} entries match: search with a narrower filter or a FLAT index")
        rows = list(self._pages(["id", "vector"], expr))
        if not rows:
            return [[] for _ in range(len(queries))]
        ids = np.array([int(r["id"]) for r in rows], dtype=np.int64)  # [M]
        vectors = np.array([r["vector"] for r in rows], dtype=np.float32)  # [M, D]
        scores = queries @ vectors.T  # [Q, M]
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [Q, k]
        return [[(float(scores[j, t]), int(ids[t])) for t in top[j]] for j in range(len(queries))]

    def hits(self, queries: np.ndarray, k: int, where: Where | str | None = None) -> list[list[Hit]]:
        scores, ids = self.search(queries, k, where)
        records = self.records(ids.reshape(-1).tolist())
        return [[Hit(int(i), float(s), records.get(int(i), {})) for s, i in zip(row_s, row_i, strict=True)]
                for row_s, row_i in zip(scores, ids, strict=True)]

    # -- a writer's changes (buffered until the block ends)
    def _writable(self) -> None:
        if not self.writer:
            raise IndexFileError(f"{self.spec.text}: change an index inside 'with writing(spec, ...)'")

    def add(self, vectors: np.ndarray, records: Sequence[dict[str, Any]]) -> np.ndarray:
        """Add unit vectors [N, D] with one record each; one id per content key (``one_id_per_content``)."""
        self._writable()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise IndexFileError(f"expected vectors of shape [N, {self.dim}], got {list(vectors.shape)}")
        if len(records) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(records)} metadata records")
        held = self._held_keys([str(r["sha1"]) for r in records if "sha1" in r])
        keep, slots = one_id_per_content(records, held)
        start = int(self.record["next_id"])
        new_ids = np.arange(start, start + len(keep), dtype=np.int64)  # [K]
        fields = set(self.record.get("fields", ()))
        for i, j in zip(new_ids.tolist(), keep, strict=True):
            record = {k: v for k, v in records[j].items() if k != "id"}
            self._adds[i] = {"id": i, "vector": vectors[j].copy(), "sha1": str(record.get("sha1") or ""),
                             "path": str(record.get("path") or "")[:VARCHAR_MAX],
                             "label": str(record.get("label") or "")[:VARCHAR_MAX], "record": record,
                             "fields": {**filter_fields(record), "id": str(i)}}
            fields |= set(record) | {"id"}
        if len(keep):
            self.record.update(next_id=start + len(keep), count=self.count() + len(keep), fields=sorted(fields))
            self.changed = True
        return np.array([new_ids[value] if is_new else value for is_new, value in slots], dtype=np.int64)

    def remove(self, ids: Iterable[int]) -> int:
        """Remove entries by id; returns how many were held."""
        self._writable()
        wanted = {int(i) for i in ids} - self._removes
        pending = wanted & set(self._adds)
        for i in pending:
            del self._adds[i]
        committed = {int(r["id"]) for r in self._committed(wanted - pending, ["id"])}
        self._removes |= committed
        removed = len(pending) + len(committed)
        if removed:
            self.record["count"] = self.count() - removed
            self.changed = True
        return removed

    def commit(self) -> int:
        """Apply the buffered changes, then write the next version record; returns the new version."""
        c = client(self.spec)
        rows = list(self._adds.values())
        per_call = max(1, INSERT_BYTES // (4 * self.dim + 512))
        for start in range(0, len(rows), per_call):
            batch = [{**row, "vector": row["vector"].tolist()} for row in rows[start:start + per_call]]
            call(self.spec, "insert", c.insert, self.spec.collection, batch, timeout=WRITE_TIMEOUT_S)
        removes = sorted(self._removes)
        for start in range(0, len(removes), PAGE):
            call(self.spec, "delete", c.delete, self.spec.collection, ids=removes[start:start + PAGE],
                 timeout=WRITE_TIMEOUT_S)
        # A strong read waits until the query nodes applied these changes, so that every reader that
        # takes the new version record sees them; its count is the collection's true count.
        self.record.update(version=self.version + 1, count=self._count_matching("id >= 0"),
                           updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        set_property(self.spec, INDEX_KEY, json.dumps(self.record, sort_keys=True))
        self._adds, self._removes, self.changed = {}, set(), False
        return self.version


def set_property(spec: MilvusSpec, key: str, value: str) -> None:
    c = client(spec)
    call(spec, "change the collection's properties", c.alter_collection_properties, spec.collection,
         properties={key: value}, timeout=WRITE_TIMEOUT_S)


_loaded: set[tuple[str, str]] = set()


def ensure_loaded(spec: MilvusSpec) -> None:
    """Load the collection into the query nodes once per process (a search of an unloaded one fails)."""
    if (spec.uri, spec.collection) in _loaded:
        return
    c = client(spec)
    state = call(spec, "read the load state", c.get_load_state, spec.collection, timeout=CALL_TIMEOUT_S)
    if "Loaded" not in str(state.get("state", state) if isinstance(state, dict) else state):
        call(spec, "load the collection", c.load_collection, spec.collection, timeout=WRITE_TIMEOUT_S)
    _loaded.add((spec.uri, spec.collection))


def create_collection(spec: MilvusSpec, new: NewIndex) -> dict[str, Any]:
    """A new, empty collection for ``new`` (its version record at version 0: not an index yet)."""
    pymilvus = _pymilvus()
    c = client(spec)
    index_type, params = index_params(new.factory, new.size_hint)
    dtype = pymilvus.DataType
    name = str(dict(new.model).get("name", "unknown model"))
    schema = c.create_schema(auto_id=False, enable_dynamic_field=False,
                             description=f"ascl-hub gallery index: embeddings of {name}"[:1000])
    schema.add_field("id", dtype.INT64, is_primary=True)
    schema.add_field("vector", dtype.FLOAT_VECTOR, dim=int(new.dim))
    schema.add_field("sha1", dtype.VARCHAR, max_length=64)
    schema.add_field("path", dtype.VARCHAR, max_length=VARCHAR_MAX)
    schema.add_field("label", dtype.VARCHAR, max_length=VARCHAR_MAX)
    schema.add_field("record", dtype.JSON)
    schema.add_field("fields", dtype.JSON)
    prepared = c.prepare_index_params()
    prepared.add_index("vector", index_type=index_type, metric_type="IP", params=params)
    factory = index_type if index_type != "HNSW" else f"HNSW{params['M']}"
    record = {"format": FORMAT, "version": 0, "dim": int(new.dim), "count": 0, "next_id": 0, "factory": factory,
              "index_type": index_type, "index_params": params, "metric": "IP", "fields": [],
              "model": dict(new.model)}
    call(spec, "create the collection", c.create_collection, spec.collection, schema=schema,
         index_params=prepared, consistency_level="Session", timeout=WRITE_TIMEOUT_S,
         properties={INDEX_KEY: json.dumps(record, sort_keys=True), WRITER_KEY: "{}"})
    return record


# ---------------------------------------------------------------------------------------- one writer at a time

def _read_lease(spec: MilvusSpec) -> dict[str, Any]:
    c = client(spec)
    described = call(spec, "describe the collection", c.describe_collection, spec.collection, timeout=CALL_TIMEOUT_S)
    try:
        lease = json.loads((described.get("properties") or {}).get(WRITER_KEY) or "{}")
    except json.JSONDecodeError:
        lease = {}
    return lease if isinstance(lease, dict) else {}


@contextlib.contextmanager
def writer_lease(spec: MilvusSpec, *, who: str, on_wait: Callable[[str], None] | None = None,
                 timeout_s: float = WAIT_S) -> Iterator[None]:
    """Hold the collection's writer lease for one change (Fischer's algorithm on a collection property).

    Take it when free or expired, wait ``LEASE_SETTLE_S`` (longer than another writer's read and
    write of it), and own it only if it still names this writer. Renewed while held; a writer that
    died leaves a lease that expires ``LEASE_S`` later. IndexBusyError after ``timeout_s``.
    """
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    told = False
    while True:
        lease = _read_lease(spec)
        holder = lease.get("token")
        if holder and holder != token and float(lease.get("until", 0)) > time.time():
            if time.monotonic() > deadline:
                raise IndexBusyError(f"{spec.text}: {lease.get('who', 'another writer')} has been writing this index "
                                     f"for over {timeout_s:.0f} s; wait for it to finish (or stop it) and run this again")
            if not told and on_wait is not None:
                on_wait(f"waiting for {lease.get('who', 'another writer')}, which is writing {spec.text} ...")
                told = True
            time.sleep(0.2)
            continue
        set_property(spec, WRITER_KEY, json.dumps({"token": token, "who": who, "until": time.time() + LEASE_S}))
        time.sleep(LEASE_SETTLE_S)
        if _read_lease(spec).get("token") == token:
            break
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_S / 4):
            with contextlib.suppress(IndexFileError):
                if _read_lease(spec).get("token") == token:
                    set_property(spec, WRITER_KEY, json.dumps({"token": token, "who": who,
                                                               "until": time.time() + LEASE_S}))

    renewer = threading.Thread(target=renew, name="milvus-writer-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(IndexFileError):
            if _read_lease(spec).get("token") == token:
                set_property(spec, WRITER_KEY, "{}")


# ---------------------------------------------------------------------------------------- the backend

class MilvusCollections:
    """The Milvus backend of ``ascl.serving.collections.index`` (``BACKEND``): an index is a collection."""

    def exists(self, spec: IndexSpec) -> bool:
        record = read_record(parse_spec(spec))
        return record is not None and int(record["version"]) > 0

    def read_info(self, spec: IndexSpec) -> dict[str, Any]:
        parsed = parse_spec(spec)
        record = read_record(parsed)
        if record is None or int(record["version"]) == 0:
            raise not_an_index(parsed)
        return MilvusIndex(parsed, record).info()

    def open(self, spec: IndexSpec) -> MilvusIndex:
        parsed = parse_spec(spec)
        record = read_record(parsed)
        if record is None or int(record["version"]) == 0:
            raise not_an_index(parsed)
        ensure_loaded(parsed)
        return MilvusIndex(parsed, record)

    @contextlib.contextmanager
    def writing(self, spec: IndexSpec, *, who: str, on_wait: Callable[[str], None] | None = None,
                create: NewIndex | None = None, model: Mapping[str, Any] | None = None) -> Iterator[MilvusIndex]:
        """The collection under its writer lease; the block's buffered changes applied as the next version
        when it ends (nothing when it raises; a collection this call created is dropped again)."""
        from ascl.export.identity import ensure_same_model

        parsed = parse_spec(spec)
        created = False
        if read_record(parsed) is None:
            if create is None:
                raise not_an_index(parsed)
            create_collection(parsed, create)
            created = True
        try:
            with writer_lease(parsed, who=who, on_wait=on_wait):
                record = read_record(parsed)
                if record is None:
                    raise not_an_index(parsed)
                ensure_loaded(parsed)
                index = MilvusIndex(parsed, record, writer=True)
                if model is not None:
                    ensure_same_model(index.model, dict(model), f"index {spec}")
                yield index
                if index.changed or index.version == 0:
                    index.commit()
        except BaseException:
            if created:  # leave no half-made collection behind
                with contextlib.suppress(Exception):
                    client(parsed).drop_collection(parsed.collection, timeout=CALL_TIMEOUT_S)
            raise

    def copy(self, spec: IndexSpec, dest: Path) -> str:
        """Nothing to copy: every server reaches the collection itself."""
        return str(spec)


def seal(spec: IndexSpec, *, timeout_s: float = 600.0) -> int:
    """Flush the collection and wait until Milvus has built its vector index over every row; returns
    the rows indexed. New rows sit in growing segments that Milvus searches exhaustively; its index
    (HNSW, IVF) covers sealed segments, which it seals by size or time, or here (benchmarks, tests)."""
    parsed = parse_spec(spec)
    c = client(parsed)
    call(parsed, "flush", c.flush, parsed.collection, timeout=WRITE_TIMEOUT_S)
    deadline = time.monotonic() + timeout_s
    while True:
        info = call(parsed, "describe the index", c.describe_index, parsed.collection, "vector",
                    timeout=CALL_TIMEOUT_S) or {}
        indexed, total = int(info.get("indexed_rows", 0)), int(info.get("total_rows", 0))
        if total and indexed >= total and not int(info.get("pending_index_rows", 0)):
            return indexed
        if time.monotonic() > deadline:
            raise IndexFileError(f"{parsed.text}: Milvus indexed {indexed} of {total} rows in {timeout_s:.0f} s")
        time.sleep(0.5)


def drop_index(spec: IndexSpec) -> bool:
    """Drop the collection of ``spec`` (tests, benchmarks); True when there was one."""
    parsed = parse_spec(spec)
    c = client(parsed)
    if not call(parsed, "look the collection up", c.has_collection, parsed.collection, timeout=CALL_TIMEOUT_S):
        return False
    call(parsed, "drop the collection", c.drop_collection, parsed.collection, timeout=WRITE_TIMEOUT_S)
    _loaded.discard((parsed.uri, parsed.collection))
    return True


BACKEND = MilvusCollections()
