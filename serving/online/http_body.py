"""An HTTP request body read within limits: bytes as sent, bytes once inflated, and time.

The front door reads bodies itself instead of letting aiohttp inflate them: aiohttp inflates a
``Content-Encoding: gzip`` body in the protocol's ``data_received``, on the event loop that
serves every other client, with no limit on the inflated size (a 1.3 MB gzip body can inflate
to 1.25 GiB). Here a compressed body is inflated as it arrives, chunk by chunk, in a worker
thread, against a running byte budget: the first chunk that would pass the request limit stops
the read, nothing more is inflated, and the connection is closed. Triton then receives the
inflated bytes without a ``Content-Encoding`` (it would inflate without any limit).
"""

from __future__ import annotations

import asyncio
import zlib
from concurrent.futures import Executor
from typing import Any

# HTTP content codings the front door inflates; zlib's wbits for each (deflate: zlib-wrapped, as
# RFC 9110 says, with raw deflate accepted too since some clients send that)
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
IDENTITY = ("", "identity")


class BodyError(Exception):
    """A body the front door refuses: ``status`` (400, 408, 413, 415) and the client's message.
    ``close``: the rest of the body was not read, so the connection must close."""

    def __init__(self, status: int, message: str, *, close: bool = True) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


def too_large(limit: int, inflated: bool = False) -> BodyError:
    what = "request body, inflated," if inflated else "request"
    return BodyError(413, f"{what} larger than the {limit / 2**20:g} MiB limit; send fewer or smaller images "
                          "per request")


class Inflater:
    """Inflates one gzip or deflate body, refusing (BodyError 413) as soon as it passes ``budget`` bytes."""

    def __init__(self, encoding: str, budget: int) -> None:
        self.encoding, self.budget, self.inflated = encoding, budget, 0
        self._d = zlib.decompressobj(ENCODINGS[encoding])
        self._first = True

    def feed(self, chunk: bytes) -> bytes:
        """The inflated bytes of the next compressed ``chunk``; never more than the budget allows."""
        try:
            out = self._d.decompress(chunk, self.budget - self.inflated + 1)
        except zlib.error:
            if not (self._first and self.encoding == "deflate"):
                raise BodyError(400, f"the body is not valid {self.encoding} data") from None
            self._d = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, without the zlib wrapper
            self._first = False
            return self.feed(chunk)
        self._first = False
        self.inflated += len(out)
        if self.inflated > self.budget or self._d.unconsumed_tail:
            raise too_large(self.budget, inflated=True)
        return out

    def finish(self) -> bytes:
        """What the compressed stream still holds; BodyError when it ended early or overflows."""
        out = self._d.flush()
        self.inflated += len(out)
        if self.inflated > self.budget:
            raise too_large(self.budget, inflated=True)
        if not self._d.eof:
            raise BodyError(400, f"the {self.encoding} body ended before its compressed stream did", close=False)
        return out


async def read_body(request: Any, limit: int, timeout_s: float, executor: Executor) -> bytes:
    """The body of aiohttp ``request``, inflated when it says gzip or deflate, at most ``limit``
    bytes both as sent and inflated, all within ``timeout_s``; BodyError otherwise."""
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)  # refused before a byte of it is read
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    inflater = None
    if encoding not in IDENTITY:
        if encoding not in ENCODINGS:
            raise BodyError(415, f"Content-Encoding {encoding!r} is not accepted; send gzip, deflate or none",
                            close=length is None or length > 0)
        inflater = Inflater(encoding, limit)
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it before a large body
    loop = asyncio.get_running_loop()
    parts: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.readany():
                received += len(chunk)
                if received > limit:
                    raise too_large(limit)
                if inflater is not None:
                    chunk = await loop.run_in_executor(executor, inflater.feed, chunk)
                parts.append(chunk)
            if inflater is not None:
                parts.append(inflater.finish())
    except TimeoutError:
        raise BodyError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)
