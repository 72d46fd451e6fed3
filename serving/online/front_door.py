"""The public ports of ``ascl serve``: gRPC and HTTP that forward only the inference API to Triton.

Triton itself listens on private 127.0.0.1 ports. The front door is what clients reach:

- **Only the data plane.** Health, server and model metadata, and inference are forwarded;
  everything else (model load/unload and the rest of the repository API, model configs,
  statistics, trace, logging, shared memory) is refused with PERMISSION_DENIED / 403 and
  never reaches Triton.
- **Bounded requests.** A request larger than ``Limits.max_request_bytes`` is refused before it
  is buffered (gRPC RESOURCE_EXHAUSTED, HTTP 413), and so is an HTTP body (gzip or deflate) that
  inflates past it: it is inflated as it arrives, in a worker thread, and refused at the first
  byte over the limit (``http_body``). A client cannot make the server or its shared memory grow
  by more than that per request.
- **Bounded connections and time.** At most ``Limits.max_connections`` open connections per port
  (more are closed at once; fewer when the process's descriptor limit would not hold them), the
  first request's headers within ``header_timeout_s``, a body within ``body_timeout_s``, idle
  connections closed after ``idle_timeout_s``, at most ``max_streams`` concurrent HTTP/2
  streams per gRPC connection.
- **Backpressure.** At most ``Limits.max_in_flight`` inference requests inside the service at
  once; more are answered at once with UNAVAILABLE / 503 (retry shortly), never queued without
  bound. Triton's own model queues are bounded too (``repository``: ``max_queue_size``), and
  their "queue full" answer passes through as UNAVAILABLE / 503.
- **No empty tensors, small filters, sane JSON** (``request_checks``): refused here with
  INVALID_ARGUMENT / 400, at any nesting depth.
- **No requests from web pages.** An HTTP request that carries a browser ``Origin`` of another
  site, or a body type a form can send without a CORS preflight, is refused.
- **Compression as the client asked.** Compressed request bodies are inflated here; a response
  is compressed only when the client's own ``Accept-Encoding`` asked for it (forwarded as sent).
- **Ports that outlive Triton.** While the supervisor restarts Triton the ports stay open: new
  requests wait for it (up to ``Limits.backend_wait_s``), requests that were inside the dead
  server fail with UNAVAILABLE / 503, and nothing gets "connection refused".

Everything runs on one asyncio loop in a background thread; nothing slow runs on it (inflating
is in a worker thread). Requests pass through as the client's own bytes; an inference request is
parsed once (protobuf, or the JSON header over HTTP) only to check it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ascl.serving.online.http_body import BodyError, read_body
from ascl.serving.online.limits import Limits
from ascl.serving.online.request_checks import (
    INFER,
    SIMPLE_FORM_TYPES,
    foreign_origin,
    grpc_forwarded,
    grpc_infer_problem,
    http_allowed,
    http_infer_problem,
)
from ascl.serving.online.server import ServerError

FORWARDED_HEADERS = ("Content-Type", "Accept-Encoding", "Inference-Header-Content-Length")
RETURNED_HEADERS = ("Content-Type", "Content-Encoding", "Inference-Header-Content-Length")
RESTARTING = "the inference server is restarting; retry shortly"
UNREACHABLE = "the inference server is not reachable (it is being restarted); retry shortly"
LOST_IN_FLIGHT = "the inference server stopped while this request was in flight; retry it"
REFUSED = ("not served on this port: ascl serve exposes health, metadata and inference only "
           "(models are loaded at start; no repository, config, statistics, trace, logging or shared-memory API)")
BACKEND_POOL = 64  # HTTP connections to Triton at most (its HTTP server has a few threads anyway)
MAX_PENDING_CALLS = 10_000  # gRPC calls grpc core holds until the loop takes them (then counted in flight)


@dataclass(frozen=True, eq=False)
class Backend:
    """Where Triton listens now; a new object for every (re)start (compared by identity)."""

    grpc: str  # host:port
    http: str  # http://host:port


class FrontDoorError(ServerError):
    """The public ports could not be opened; the message names the port."""


class BoundedLog:
    """Log lines at most once per ``every_s`` per kind, saying how many like it were dropped:
    a flood (of refused connections, of accept errors) must not become a flood of log lines."""

    def __init__(self, log: Callable[[str], None], every_s: float = 10.0) -> None:
        self.log, self.every_s = log, every_s
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, text: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e9) < self.every_s:
                self._dropped[kind] = self._dropped.get(kind, 0) + 1
                return
            self._last[kind] = now
            dropped = self._dropped.pop(kind, 0)
        self.log(text + (f" ({dropped} more like this in the last {self.every_s:g} s)" if dropped else ""))


def _over_capacity(limit: int) -> str:
    return (f"the server is at capacity ({limit} requests in flight); retry shortly "
            "(ascl serve --max-in-flight raises the limit)")


class FrontDoor:
    """gRPC on ``grpc_port`` and HTTP on ``http_port`` of ``host``, forwarding to ``set_backend``'s Triton."""

    def __init__(self, host: str, grpc_port: int, http_port: int, limits: Limits | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.host, self.grpc_port, self.http_port = host, grpc_port, http_port
        asked = limits or Limits()
        self.limits = asked.within_descriptors()
        self.log = BoundedLog(log or (lambda text: print(text, flush=True)))
        if self.limits.max_connections < asked.max_connections:
            self.log("fd-limit", f"front door: at most {self.limits.max_connections} connections per port, not "
                                 f"{asked.max_connections}: that is what the open-file limit (ulimit -n) holds")
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
        self._thread = threading.Thread(target=self._loop.run_forever, name="front-door", daemon=True)
        self._inflate = ThreadPoolExecutor(max_workers=2, thread_name_prefix="front-door-inflate")
        self._backend: Backend | None = None
        # called (on the door's loop) when Triton refused a connection: the supervisor looks at once
        self.on_unreachable: Callable[[], None] | None = None
        self.in_flight = 0  # inference requests inside the service now (read on the loop)
        # calls Triton answered (a result or its own error), ever: the supervisor's sign that a slow
        # Triton is busy, not hung (read from its thread; an int is read whole)
        self.answered = 0
        self._channel: Any = None
        self._calls: dict[str, Any] = {}  # method -> multicallable on the current channel
        self._session: Any = None
        self._grpc_server: Any = None
        self._grpc_handlers: dict[str, Any] = {}  # method -> its handler (made once)
        self._http_server: Any = None  # aiohttp's low-level web.Server (one RequestHandler per connection)
        self._http_listener: asyncio.Server | None = None
        self._awaiting_first: dict[Any, asyncio.TimerHandle] = {}  # connections yet to send a request
        self._http_open: set[Any] = set()  # HTTP connections (their aiohttp handlers) open now

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
            self._inflate.shutdown(wait=False, cancel_futures=True)

    def _call(self, coro: Awaitable[Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's unhandled errors (above all ``accept()`` out of descriptors), at a bounded rate."""
        exc = context.get("exception")
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        self.log(f"loop:{context.get('message')}", f"front door: {context.get('message')}{detail}")

    # ------------------------------------------------------------------ on the loop

    async def _start(self) -> None:
        import grpc
        from aiohttp import web

        lim = self.limits
        self._grpc_server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", lim.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_allowed_incoming_connections", lim.max_connections),
            ("grpc.max_concurrent_streams", lim.max_streams),
            ("grpc.max_connection_idle_ms", int(lim.idle_timeout_s * 1000)),
            ("grpc.server_handshake_timeout_ms", int(lim.header_timeout_s * 1000)),
            # calls waiting for the loop to take them: grpc core cancels them without a word past
            # its soft limit (1,000); the in-flight limit answers them instead, with a reason
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
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
        # aiohttp's low-level server: no body inflation of its own (read_body does it, bounded), the
        # idle timeout as its keep-alive, a short linger for the unread rest of a refused body
        door = self

        class Server(web.Server):  # type: ignore[misc]
            """aiohttp's low-level server, telling the door when a connection is gone."""

            def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
                super().connection_lost(handler, exc)
                door._http_open.discard(handler)

        self._http_server = Server(self._http_handler, handler_cancellation=True, access_log=None,
                                   keepalive_timeout=lim.idle_timeout_s, auto_decompress=False, lingering_time=2.0)
        try:
            self._http_listener = await asyncio.get_running_loop().create_server(
                self._http_connection, self.host, self.http_port, reuse_address=True, reuse_port=False, backlog=512)
        except OSError as exc:
            await self._grpc_server.stop(0)
            raise FrontDoorError(f"{self.host}:{self.http_port} (http port) could not be opened ({exc.strerror}); "
                                 "pick another with --http-port") from exc

    def _http_connection(self) -> asyncio.BaseProtocol:
        """A protocol for each accepted HTTP connection: aiohttp's, or one 503 when over the cap."""
        if len(self._http_open) >= self.limits.max_connections:
            self.log("http-cap", f"front door: HTTP connection refused: {self.limits.max_connections} are open "
                                 "(--max-connections)")
            return _Refused()
        handler = self._http_server()
        self._http_open.add(handler)  # counted now: a burst of accepts runs every factory call first
        timer = self._loop.call_later(self.limits.header_timeout_s, self._first_request_late, handler)
        self._awaiting_first[handler] = timer
        return handler  # type: ignore[no-any-return]

    def _first_request_late(self, handler: Any) -> None:
        """Close a connection whose first request did not arrive in time (slow or no headers)."""
        if self._awaiting_first.pop(handler, None) is not None:
            handler.force_close()

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
            # its forwarded Content-Encoding describes; no Accept-Encoding of aiohttp's own
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=BACKEND_POOL), auto_decompress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent"))
        for closing in (old_channel, old_session):
            if closing is not None:
                await closing.close()

    async def _stop(self, grace_s: float) -> None:
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace_s)  # new RPCs get UNAVAILABLE at once
        if self._http_listener is not None:
            self._http_listener.close()  # no new connections
            await self._http_server.shutdown(grace_s)  # requests in flight finish
        for timer in self._awaiting_first.values():
            timer.cancel()
        self._awaiting_first.clear()
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
        """One forwarded call; inference counts against ``max_in_flight``."""
        import grpc

        if not method.endswith(INFER):
            return await self._forward_grpc(method, request, context)
        problem = grpc_infer_problem(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.in_flight >= self.limits.max_in_flight:
            self.log("grpc-full", f"front door: refusing gRPC inference: {self.in_flight} in flight (--max-in-flight)")
            await context.abort(grpc.StatusCode.UNAVAILABLE, _over_capacity(self.limits.max_in_flight))
        self.in_flight += 1
        try:
            return await self._forward_grpc(method, request, context)
        finally:
            self.in_flight -= 1

    async def _forward_grpc(self, method: str, request: bytes, context: Any) -> bytes:
        import grpc

        stale: Backend | None = None
        for attempt in (1, 2):
            backend = self._backend
            if backend is None or stale is not None:
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
                reply = await call(request, timeout=context.time_remaining())
                self.answered += 1
                return reply  # type: ignore[no-any-return]
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
                if not _never_arrived(code, details) and not _lost_backend(code, details):
                    self.answered += 1  # Triton's own answer (a client error, a full queue)
                if _never_arrived(code, details):  # Triton is down: it never saw this request
                    self._unreachable()
                    if attempt == 1:
                        stale = backend
                        continue
                    await context.abort(grpc.StatusCode.UNAVAILABLE, UNREACHABLE)
                if not _queue_full(details) and (_lost_backend(code, details) or backend is not self._backend):
                    code, details = grpc.StatusCode.UNAVAILABLE, LOST_IN_FLIGHT
                await context.abort(code, details)
        raise AssertionError("unreachable")  # context.abort raises

    # ------------------------------------------------------------------ HTTP

    async def _http_handler(self, request: Any) -> Any:
        from aiohttp import web

        self._first_request_came(request.protocol)
        method = request.method
        if not http_allowed(method, request.path):
            return _json_error(403, REFUSED)
        headers = request.headers
        if "Origin" in headers and foreign_origin(headers.get("Origin"), headers.get("Host")):
            return _json_error(403, "cross-site requests from web pages are refused")
        if method != "POST":
            return await self._forward_http(request, b"")
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type in SIMPLE_FORM_TYPES:
            return _json_error(415, f"Content-Type {content_type!r} is not accepted; send application/json "
                                    "or application/octet-stream (Triton's binary tensor extension)", close=True)
        if self.in_flight >= self.limits.max_in_flight:
            self.log("http-full", f"front door: refusing HTTP inference: {self.in_flight} in flight (--max-in-flight)")
            response = _json_error(503, _over_capacity(self.limits.max_in_flight), close=True)
            response.headers["Retry-After"] = "1"
            return response
        self.in_flight += 1
        try:
            try:
                body = await read_body(request, self.limits.max_request_bytes, self.limits.body_timeout_s,
                                       self._inflate)
            except BodyError as exc:
                return _json_error(exc.status, exc.message, close=exc.close)
            except (web.HTTPException, ConnectionError, ValueError) as exc:  # a broken chunked body, a reset
                return _json_error(400, f"the request body could not be read ({type(exc).__name__})", close=True)
            problem = http_infer_problem(body, headers.get("Inference-Header-Content-Length"))
            if problem:
                return _json_error(400, problem)
            return await self._forward_http(request, body)
        finally:
            self.in_flight -= 1

    def _first_request_came(self, handler: Any) -> None:
        timer = self._awaiting_first.pop(handler, None)
        if timer is not None:
            timer.cancel()

    async def _forward_http(self, request: Any, body: bytes) -> Any:
        import aiohttp
        from aiohttp import web

        headers = {k: request.headers[k] for k in FORWARDED_HEADERS if k in request.headers}
        stale: Backend | None = None
        for attempt in (1, 2):
            backend = self._backend
            if backend is None or stale is not None:
                backend = await self._current(stale)
            session = self._session
            if backend is None or session is None:
                return _json_error(503, RESTARTING)
            try:
                async with session.request(request.method, backend.http + request.path_qs, data=body or None,
                                           headers=headers) as resp:
                    payload = await resp.read()
                    self.answered += 1
                    out = {k: resp.headers[k] for k in RETURNED_HEADERS if k in resp.headers}
                    return web.Response(status=resp.status, body=payload, headers=out)
            except aiohttp.ClientConnectorError:  # Triton is down: it never saw this request
                self._unreachable()
                if attempt == 1:
                    stale = backend
                    continue
                return _json_error(503, UNREACHABLE)
            except RuntimeError:  # "Session is closed": replaced before the request left
                if attempt == 1 and session.closed:
                    stale = backend
                    continue
            except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
                pass
            break
        return _json_error(503, LOST_IN_FLIGHT)


def _never_arrived(code: Any, details: str) -> bool:
    """A gRPC error that says the connection to Triton could not be made (the request never left)."""
    import grpc

    text = details.lower()
    return code == grpc.StatusCode.UNAVAILABLE and ("failed to connect" in text or "connection refused" in text)


def _queue_full(details: str) -> bool:
    """Triton's own backpressure: a model's bounded queue is full (UNAVAILABLE, passed through as is)."""
    return "maximum queue size" in details.lower()


def _lost_backend(code: Any, details: str) -> bool:
    """An error that says the server (or a backend stub) went away, not that the request was bad."""
    import grpc

    text = details.lower()
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or (
        code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        and any(s in text for s in ("not healthy", "stub process", "socket closed", "connection reset"))
    )


def _json_error(status: int, message: str, *, close: bool = False) -> Any:
    """A JSON error response; ``close``: the connection closes after it (the body was not all read)."""
    from aiohttp import web

    response = web.json_response({"error": message}, status=status)
    if close:
        response.force_close()
    return response


class _Refused(asyncio.Protocol):
    """An HTTP connection over the cap: one 503, then closed (its request is never read)."""

    BODY = b'{"error": "too many open connections; retry shortly"}'
    ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
              b"Connection: close\r\nContent-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.ANSWER)  # type: ignore[attr-defined]
        transport.close()


class _GrpcRouter:
    """A generic handler: forwarded methods go to Triton, the rest are refused here (one handler per method)."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door

    def service(self, details: Any) -> Any:
        method = str(details.method)
        handler = self.door._grpc_handlers.get(method)
        if handler is None:
            handler = self._handler(method)
            if grpc_forwarded(method):  # a fixed set: any other name is refused (and not remembered)
                self.door._grpc_handlers[method] = handler
        return handler

    def _handler(self, method: str) -> Any:
        import grpc

        if grpc_forwarded(method):
            door = self.door

            async def forward(request: bytes, context: Any) -> bytes:
                return await door.forward_grpc(method, request, context)

            return grpc.unary_unary_rpc_method_handler(forward)

        if method.rsplit("/", 1)[-1].startswith("ModelStream"):
            async def refuse_stream(requests: Any, context: Any) -> Any:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, REFUSED)
                yield b""  # pragma: no cover

            return grpc.stream_stream_rpc_method_handler(refuse_stream)

        async def refuse(request: bytes, context: Any) -> bytes:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, REFUSED)
            return b""

        return grpc.unary_unary_rpc_method_handler(refuse)
