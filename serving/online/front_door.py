"""The public ports of ``ascl serve``: gRPC and HTTP that forward only the inference API to Triton.

Triton itself listens on private 127.0.0.1 ports. The front door is what clients reach:

- **Only the data plane.** Health, server and model metadata, and inference are forwarded;
  everything else (model load/unload and the rest of the repository API, model configs,
  statistics, trace, logging, shared memory) is refused with PERMISSION_DENIED / 403 and
  never reaches Triton.
- **Bounded requests.** A request larger than ``Limits.max_request_bytes`` is refused by the
  transport before it is buffered (gRPC RESOURCE_EXHAUSTED, HTTP 413), so a client cannot
  make the server or its shared memory grow by more than that per request.
- **No empty tensors.** An inference request with a zero-sized dimension (a batch of no
  images) is refused here (INVALID_ARGUMENT / 400): Triton 2.51 would batch it with other
  clients' requests, and the Python backend then fails the whole batch while unpacking it.
- **Small filters.** The optional ``where`` input (a metadata filter, JSON text per row) is
  forwarded like every other input, but a filter over the size limit (``filter_size_problem``: 16 KiB), or more
  than ``MAX_FILTER_ROWS`` of them, is refused here (INVALID_ARGUMENT / 400).
- **No requests from web pages.** An HTTP request that carries a browser ``Origin`` of another
  site, or a body type a form can send without a CORS preflight (``text/plain``,
  ``application/x-www-form-urlencoded``, ``multipart/form-data``), is refused.
- **Ports that outlive Triton.** While the supervisor restarts Triton the ports stay open: new
  requests wait for it (up to ``Limits.backend_wait_s``), requests that were inside the dead
  server fail with UNAVAILABLE / 503, and nothing gets "connection refused".

Everything runs on one asyncio loop in a background thread. Requests pass through as the
client's own bytes; an inference request is parsed once (protobuf, or the JSON header over
HTTP) only to check its shapes, so the cost per request is a few hundred microseconds.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ascl.names import WHERE
from ascl.serving.collections.filters import filter_size_problem
from ascl.serving.online.server import ServerError

GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_FORWARDED = frozenset({"ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer"})
HTTP_FORWARDED = (
    ("GET", re.compile(r"/v2(/health/(live|ready))?")),
    ("GET", re.compile(r"/v2/models/[A-Za-z0-9_.-]+(/versions/[0-9]+)?(/ready)?")),
    ("POST", re.compile(r"/v2/models/[A-Za-z0-9_.-]+(/versions/[0-9]+)?/infer")),
)
# body types a web page can POST cross-site without a CORS preflight
SIMPLE_FORM_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
FORWARDED_HEADERS = ("Content-Type", "Content-Encoding", "Accept-Encoding", "Inference-Header-Content-Length")
INFER = "ModelInfer"
MAX_FILTER_ROWS = 1024  # elements of one `where` tensor (a request holds at most 64 rows)
RESTARTING = "the inference server is restarting; retry shortly"
LOST_IN_FLIGHT = "the inference server stopped while this request was in flight; retry it"
REFUSED = ("not served on this port: ascl serve exposes health, metadata and inference only "
           "(models are loaded at start; no repository, config, statistics, trace, logging or shared-memory API)")


@dataclass(frozen=True)
class Limits:
    """What one request may claim at the front door."""

    max_request_bytes: int = 64 * 1024 * 1024  # the whole request as sent (64 images of 1 MiB)
    backend_wait_s: float = 30.0  # how long a request waits for a restarting Triton


@dataclass(frozen=True, eq=False)
class Backend:
    """Where Triton listens now; a new object for every (re)start (compared by identity)."""

    grpc: str  # host:port
    http: str  # http://host:port


class FrontDoorError(ServerError):
    """The public ports could not be opened; the message names the port."""


def http_allowed(method: str, path: str) -> bool:
    return any(method == m and pattern.fullmatch(path) for m, pattern in HTTP_FORWARDED)


def foreign_origin(origin: str | None, host: str | None) -> bool:
    """True for a browser request from a page of another site (``Origin`` host differs from ``Host``)."""
    if not origin:
        return False
    origin_host = re.sub(r"^[a-z][a-z0-9+.-]*://", "", origin.strip().lower()).rstrip("/")
    return origin_host != (host or "").strip().lower()


class FrontDoor:
    """gRPC on ``grpc_port`` and HTTP on ``http_port`` of ``host``, forwarding to ``set_backend``'s Triton."""

    def __init__(self, host: str, grpc_port: int, http_port: int, limits: Limits | None = None) -> None:
        self.host, self.grpc_port, self.http_port = host, grpc_port, http_port
        self.limits = limits or Limits()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="front-door", daemon=True)
        self._backend: Backend | None = None
        # called (on the door's loop) when Triton refused a connection: the supervisor looks at once
        self.on_unreachable: Callable[[], None] | None = None
        self._channel: Any = None
        self._calls: dict[str, Any] = {}  # method -> multicallable on the current channel
        self._session: Any = None
        self._grpc_server: Any = None
        self._http_runner: Any = None

    # ------------------------------------------------------------------ life cycle (any thread)

    def start(self) -> FrontDoor:
        """Open both ports (FrontDoorError if one cannot be bound); returns at once."""
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            raise
        return self

    def set_backend(self, backend: Backend | None) -> None:
        """Point at a (re)started Triton, or at none while it restarts (requests then wait)."""
        self._call(self._set_backend(backend))

    def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, let the ones in flight finish (up to ``grace_s``), close the ports."""
        if not self._thread.is_alive():
            return
        try:
            self._call(self._stop(grace_s), timeout=grace_s + 15)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _call(self, coro: Awaitable[Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ on the loop

    async def _start(self) -> None:
        import grpc
        from aiohttp import web

        self._grpc_server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.limits.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ])
        self._grpc_server.add_generic_rpc_handlers((_GrpcRouter(self),))
        try:
            bound = self._grpc_server.add_insecure_port(f"{self.host}:{self.grpc_port}")
        except RuntimeError as exc:
            bound, reason = 0, str(exc)
        else:
            reason = "in use"
        if not bound:
            raise FrontDoorError(f"{self.host}:{self.grpc_port} (grpc port) could not be opened ({reason}); "
                                 "pick another with --grpc-port")
        await self._grpc_server.start()
        app = web.Application(client_max_size=self.limits.max_request_bytes)
        app.router.add_route("*", "/{tail:.*}", self._http_handler)
        self._http_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._http_runner.setup()
        try:
            await web.TCPSite(self._http_runner, self.host, self.http_port, reuse_port=False).start()
        except OSError as exc:
            await self._grpc_server.stop(0)
            raise FrontDoorError(f"{self.host}:{self.http_port} (http port) could not be opened ({exc.strerror}); "
                                 "pick another with --http-port") from exc

    async def _set_backend(self, backend: Backend | None) -> None:
        import aiohttp
        import grpc

        old_channel, old_session = self._channel, self._session
        self._backend = backend
        self._calls = {}
        if backend is None:
            self._channel = self._session = None
        else:
            self._channel = grpc.aio.insecure_channel(backend.grpc, options=[
                ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
            # auto_decompress off: a gzip answer (the client's Accept-Encoding) goes back as the bytes
            # its forwarded Content-Encoding describes, not decompressed under a gzip header
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        for closing in (old_channel, old_session):
            if closing is not None:
                await closing.close()

    async def _stop(self, grace_s: float) -> None:
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace_s)  # new RPCs get UNAVAILABLE at once
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        await self._set_backend(None)

    async def _current(self, stale: Backend | None = None, stale_grace_s: float = 3.0) -> Backend | None:
        """The live backend, waiting up to ``backend_wait_s`` while Triton restarts.

        With ``stale`` (a backend that just refused a connection) it waits for another one; if
        the supervisor keeps ``stale`` (it answers its probes), ``stale`` again after the grace.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            current = self._backend
            waited = loop.time() - started
            if current is not None and (current is not stale or waited > stale_grace_s):
                return current
            if waited > self.limits.backend_wait_s:
                return None
            await asyncio.sleep(0.05)

    def _unreachable(self) -> None:
        if self.on_unreachable is not None:
            self.on_unreachable()

    # ------------------------------------------------------------------ gRPC

    async def forward_grpc(self, method: str, request: bytes, context: Any) -> bytes:
        import grpc

        if method.endswith("/" + INFER):
            problem = grpc_infer_problem(request)
            if problem:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        stale: Backend | None = None
        for attempt in (1, 2):
            backend = await self._current(stale)
            if backend is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, RESTARTING)
            channel = self._channel
            if channel is None:  # replaced while we waited: take the new one
                continue
            try:
                call = self._calls.get(method)
                if call is None:  # bytes in, bytes out
                    call = self._calls[method] = channel.unary_unary(method)
                return await call(request, timeout=context.time_remaining())  # type: ignore[no-any-return]
            except grpc.aio.UsageError:  # the channel closed before the call began: it never left
                if attempt == 1:
                    stale = backend
                    continue
                await context.abort(grpc.StatusCode.UNAVAILABLE, RESTARTING)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # the client went away: let it be cancelled
                    raise
                # the supervisor closed this channel: Triton was killed with the request inside it
                await context.abort(grpc.StatusCode.UNAVAILABLE, LOST_IN_FLIGHT)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if attempt == 1 and _never_arrived(code, details):  # Triton is down: it never saw this request
                    stale = backend
                    self._unreachable()
                    continue
                if _lost_backend(code, details) or backend is not self._backend:
                    code, details = grpc.StatusCode.UNAVAILABLE, LOST_IN_FLIGHT
                await context.abort(code, details)
        raise AssertionError("unreachable")  # context.abort raises

    # ------------------------------------------------------------------ HTTP

    async def _http_handler(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web

        if not http_allowed(request.method, request.path):
            return _json_error(403, REFUSED)
        if foreign_origin(request.headers.get("Origin"), request.headers.get("Host")):
            return _json_error(403, "cross-site requests from web pages are refused")
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if request.method == "POST" and content_type in SIMPLE_FORM_TYPES:
            return _json_error(415, f"Content-Type {content_type!r} is not accepted; send application/json "
                                    "or application/octet-stream (Triton's binary tensor extension)")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _json_error(413, f"request larger than the {self.limits.max_request_bytes // 2**20} MiB limit")
        if request.method == "POST":
            problem = http_infer_problem(body, request.headers.get("Inference-Header-Content-Length"))
            if problem:
                return _json_error(400, problem)
        headers = {k: request.headers[k] for k in FORWARDED_HEADERS if k in request.headers}
        stale: Backend | None = None
        for attempt in (1, 2):
            backend = await self._current(stale)
            session = self._session
            if backend is None or session is None:
                return _json_error(503, RESTARTING)
            try:
                async with session.request(request.method, backend.http + request.path_qs, data=body or None,
                                                 headers=headers) as resp:
                    payload = await resp.read()
                    out = {k: resp.headers[k] for k in FORWARDED_HEADERS if k in resp.headers}
                    return web.Response(status=resp.status, body=payload, headers=out)
            except aiohttp.ClientConnectorError:  # Triton is down: it never saw this request
                if attempt == 1:
                    stale = backend
                    self._unreachable()
                    continue
            except RuntimeError:  # "Session is closed": replaced before the request left
                if attempt == 1 and session.closed:
                    stale = backend
                    continue
            except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
                pass
            break
        return _json_error(503, LOST_IN_FLIGHT)


def empty_shape_problem(name: str, shape: list[int]) -> str | None:
    if any(int(d) == 0 for d in shape):
        return f"input {name!r} has shape {list(shape)}: a request needs at least one item (image)"
    return None


def grpc_infer_problem(request: bytes) -> str | None:
    """Why a serialized ``ModelInferRequest`` must not reach Triton (None when it may)."""
    from tritonclient.grpc import service_pb2

    try:
        message = service_pb2.ModelInferRequest.FromString(request)
    except Exception:  # protobuf's DecodeError; Triton would refuse it too
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
    import json

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
    except (ValueError, TypeError, AttributeError):
        return "the request is not a KServe v2 inference request (JSON header)"
    return None


def _flat(data: Any) -> list[Any]:
    """The elements of a JSON tensor's ``data`` (nested lists or flat)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flat(item))
        if len(out) > MAX_FILTER_ROWS:
            break
    return out


def _never_arrived(code: Any, details: str) -> bool:
    """A gRPC error that says the connection to Triton could not be made (the request never left)."""
    import grpc

    text = details.lower()
    return code == grpc.StatusCode.UNAVAILABLE and ("failed to connect" in text or "connection refused" in text)


def _lost_backend(code: Any, details: str) -> bool:
    """An error that says the server (or a backend stub) went away, not that the request was bad."""
    import grpc

    text = details.lower()
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or (
        code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        and any(s in text for s in ("not healthy", "stub process", "socket closed", "connection reset"))
    )


def _json_error(status: int, message: str) -> Any:
    from aiohttp import web

    return web.json_response({"error": message}, status=status)


class _GrpcRouter:
    """A generic handler: forwarded methods go to Triton, the rest are refused here."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door

    def service(self, details: Any) -> Any:
        import grpc

        method = str(details.method)
        name = method.rsplit("/", 1)[-1]
        if method.startswith(GRPC_SERVICE) and name in GRPC_FORWARDED:
            async def forward(request: bytes, context: Any) -> bytes:
                return await self.door.forward_grpc(method, request, context)

            return grpc.unary_unary_rpc_method_handler(forward)

        async def refuse(request: bytes, context: Any) -> bytes:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, REFUSED)
            return b""

        if name.startswith("ModelStream"):
            async def refuse_stream(requests: Any, context: Any) -> Any:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, REFUSED)
                yield b""  # pragma: no cover

            return grpc.stream_stream_rpc_method_handler(refuse_stream)
        return grpc.unary_unary_rpc_method_handler(refuse)
