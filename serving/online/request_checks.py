"""What the front door checks in a request before Triton sees it: pure functions over bytes and text.

Each returns why a request must not reach Triton (a message for the client, who sent something
wrong: INVALID_ARGUMENT / 400), or None when it may. Nothing here keeps state or does I/O, so
the front door calls them inline at a few microseconds per request.

- Which APIs are forwarded at all (the data plane: health, metadata, inference).
- Browser requests from another site (a foreign ``Origin``).
- Inference requests with a zero-sized dimension (a batch of no images): Triton 2.51 would batch
  them with other clients' requests and the Python backend then fails the whole batch.
- The optional ``where`` input (metadata filters, JSON text per row): at most ``MAX_FILTER_ROWS``
  of them, each within ``filter_size_problem``'s limit.
- JSON that is not a KServe v2 request, however deeply it is nested.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ascl.names import WHERE
from ascl.serving.collections.filters import filter_size_problem

GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_FORWARDED = frozenset({"ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer"})
INFER = "ModelInfer"
HTTP_FORWARDED = (
    ("GET", re.compile(r"/v2(/health/(live|ready))?")),
    ("GET", re.compile(r"/v2/models/[A-Za-z0-9_.-]+(/versions/[0-9]+)?(/ready)?")),
    ("POST", re.compile(r"/v2/models/[A-Za-z0-9_.-]+(/versions/[0-9]+)?/infer")),
)
# body types a web page can POST cross-site without a CORS preflight
SIMPLE_FORM_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
MAX_FILTER_ROWS = 1024  # elements of one `where` tensor (a request holds at most 64 rows)
NOT_KSERVE = "the request is not a KServe v2 inference request (JSON header)"


def http_allowed(method: str, path: str) -> bool:
    return any(method == m and pattern.fullmatch(path) for m, pattern in HTTP_FORWARDED)


def grpc_forwarded(method: str) -> bool:
    """True for the gRPC methods the front door forwards (``/inference.GRPCInferenceService/ModelInfer``...)."""
    return method.startswith(GRPC_SERVICE) and method[len(GRPC_SERVICE):] in GRPC_FORWARDED


def foreign_origin(origin: str | None, host: str | None) -> bool:
    """True for a browser request from a page of another site (``Origin`` host differs from ``Host``)."""
    if not origin:
        return False
    origin_host = re.sub(r"^[a-z][a-z0-9+.-]*://", "", origin.strip().lower()).rstrip("/")
    return origin_host != (host or "").strip().lower()


def empty_shape_problem(name: str, shape: list[int]) -> str | None:
    if any(int(d) == 0 for d in shape):
        return f"input {name!r} has shape {list(shape)}: a request needs at least one item (image)"
    return None


def grpc_infer_problem(request: bytes) -> str | None:
    """Why a serialized ``ModelInferRequest`` must not reach Triton (None when it may)."""
    from tritonclient.grpc import service_pb2

    try:
        message = service_pb2.ModelInferRequest.FromString(request)
    except Exception:  # protobuf's DecodeError (or its recursion limit); Triton would refuse it too
        return "not a valid ModelInferRequest"
    raw = message.raw_input_contents
    for at, inp in enumerate(message.inputs):
        problem = empty_shape_problem(inp.name, list(inp.shape))
        if not problem and inp.name == WHERE:
            if len(raw) == len(message.inputs):
                problem = where_problem(list(inp.shape), raw=raw[at])
            else:
                problem = where_problem(list(inp.shape), sizes=[len(b) for b in inp.contents.bytes_contents])
        if problem:
            return problem
    return None


def where_problem(shape: list[int], *, raw: bytes | None = None, sizes: list[int] | None = None) -> str | None:
    """Why a ``where`` tensor (Triton's serialized BYTES: a 4-byte little-endian length before each
    element, or the element sizes) must not reach Triton: too many rows, or a filter over the limit."""
    count = 1
    for d in shape:
        count *= max(int(d), 0)
    if count > MAX_FILTER_ROWS:
        return f"input {WHERE!r} has {count} elements; at most {MAX_FILTER_ROWS} filters per request"
    if raw is not None:
        sizes, at = [], 0
        while at < len(raw) and len(sizes) <= count:
            size = int.from_bytes(raw[at:at + 4], "little") if at + 4 <= len(raw) else -1
            if size < 0 or at + 4 + size > len(raw):
                return f"input {WHERE!r} is not a valid BYTES tensor"
            sizes.append(size)
            at += 4 + size
    problem = filter_size_problem(max(sizes or [0]))
    return f"input {WHERE!r}: {problem}" if problem else None


def http_infer_problem(body: bytes, header_length: str | None) -> str | None:
    """The same check for a KServe v2 HTTP inference body (JSON header, then binary tensors)."""
    try:
        header = json.loads(body[: int(header_length)] if header_length else body)
        inputs = header.get("inputs", []) if isinstance(header, dict) else []
        offset = int(header_length) if header_length else len(body)  # binary tensors follow, in input order
        for inp in inputs:
            shape = list(inp.get("shape", []))
            problem = empty_shape_problem(str(inp.get("name")), shape)
            binary = int((inp.get("parameters") or {}).get("binary_data_size", 0))
            if not problem and inp.get("name") == WHERE:
                if binary:
                    problem = where_problem(shape, raw=body[offset:offset + binary])
                else:
                    problem = where_problem(shape, sizes=[len(str(v).encode()) for v in _flat(inp.get("data", []))])
            offset += binary
            if problem:
                return problem
    except RecursionError:  # JSON nested deeper than any request: the client's fault, not the server's
        return f"{NOT_KSERVE}: nested too deeply"
    except (ValueError, TypeError, AttributeError):
        return NOT_KSERVE
    return None


def _flat(data: Any) -> list[Any]:
    """The elements of a JSON tensor's ``data`` (nested lists or flat), at most ``MAX_FILTER_ROWS + 1``."""
    out: list[Any] = []
    stack = [data]
    while stack and len(out) <= MAX_FILTER_ROWS:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out
