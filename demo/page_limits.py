"""What a web user may send the demo page (bytes per request, adds per client) and where it is kept.

- ``BodyLimit``: every HTTP request body to the page is bounded before it is read: an upload
  (``multipart/form-data``, what the page and ``gradio_client`` send images as) at most
  ``MAX_UPLOAD_BYTES`` (the image limit, ``ascl.images.MAX_IMAGE_BYTES``, and room for the form),
  any other body (the JSON of an API call) at most ``MAX_JSON_BYTES``, so a ``data:`` URL image
  inside an API call is at most about 0.7 MiB. A ``Content-Length`` over the limit is refused
  (413) before the body is kept anywhere, a chunked body as soon as it passes the limit; a body up
  to ``DRAIN_FACTOR`` times the limit is read and dropped first so that the client hears why, a
  larger one is left unread and the connection closed. Gradio reads and parses
  a JSON body of any size, and keeps each session's last input in memory (``MAX_SESSIONS`` of
  them, least recently used first out).
- ``AddQuota``: how many images the page adds to the gallery: per client address in a sliding
  hour, and in all for one run of the page. Every added image is a file in the index folder.
- ``upload_folder``: Gradio's uploads and the page's thumbnails go to a folder of this process
  (``$GRADIO_TEMP_DIR`` when the user set one), removed when the page stops; Gradio's default,
  ``/tmp/gradio``, would keep every upload forever.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from ascl.images import MAX_IMAGE_BYTES

MAX_UPLOAD_BYTES = MAX_IMAGE_BYTES + 2**20  # a multipart upload: one image (Gradio: max_file_size) and its form
MAX_JSON_BYTES = 2**20  # any other request body: an API call's JSON
MAX_SESSIONS = 128  # sessions whose last inputs Gradio keeps in memory
DRAIN_FACTOR = 4  # a refused body up to this many times its limit is read (and dropped) so the 413 is heard
ADDS_PER_CLIENT = 20  # images one client address may add per hour
MAX_ADDS = 500  # images the page adds in one run, all clients together
WINDOW_S = 3600.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: request bodies over their limit get 413 and are never read whole; uploads
    (multipart) may be ``upload_limit`` bytes, every other body ``json_limit``."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], upload_limit: int = MAX_UPLOAD_BYTES,
                 json_limit: int = MAX_JSON_BYTES) -> None:
        self.app, self.upload_limit, self.json_limit = app, upload_limit, json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        upload = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        limit = self.upload_limit if upload else self.json_limit
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            if int(length) <= DRAIN_FACTOR * limit:  # read and drop it, so that the client hears why
                await _drain(receive, DRAIN_FACTOR * limit)
            await self._refuse(send, limit, upload)
            return
        received = 0
        over = refused = False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _TooLarge
            return message

        async def refuse_once() -> None:
            nonlocal refused
            if not refused:
                refused = True
                await _drain(receive, DRAIN_FACTOR * limit - received)
                await self._refuse(send, limit, upload)

        async def sending(message: Message) -> None:
            if over:  # the app answers the broken read its own way (FastAPI: 400): answer 413 instead
                await refuse_once()
                return
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            await refuse_once()

    async def _refuse(self, send: Send, limit: int, upload: bool) -> None:
        what = (f"an upload may be at most {limit / 2**20:g} MiB (images: {MAX_IMAGE_BYTES / 2**20:g} MiB)" if upload
                else f"a request body other than an upload may be at most {limit / 2**20:g} MiB; upload larger "
                     "images as files (gradio_client: handle_file)")
        body = f'{{"error": "request body too large for this page: {what}"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


async def _drain(receive: Receive, budget: int) -> None:
    """Read and drop the rest of a refused body, up to ``budget`` bytes (past that the connection closes
    with the body unread: the client may then see a reset instead of the 413)."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        budget -= len(message.get("body", b""))


class QuotaError(Exception):
    """An add over the quota; the message says which limit and when to try again."""


class AddQuota:
    """At most ``per_client`` adds per client address in any ``window_s``, and ``total`` per run."""

    def __init__(self, per_client: int = ADDS_PER_CLIENT, total: int = MAX_ADDS, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_client, self.total, self.window_s, self.clock = per_client, total, window_s, clock
        self.added = 0
        self._recent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> None:
        """Count one add by ``client``; QuotaError (nothing counted) when it is over a limit."""
        now = self.clock()
        with self._lock:
            if self.total <= 0:
                raise QuotaError("Adding images is switched off on this page (--max-adds 0).")
            if self.added >= self.total:
                raise QuotaError(f"This page has added its limit of {self.total} images (--max-adds); "
                                 "it adds no more until it is restarted.")
            recent = self._recent.setdefault(client, deque())
            while recent and now - recent[0] >= self.window_s:
                recent.popleft()
            if len(recent) >= self.per_client:
                wait_min = max(1, int((self.window_s - (now - recent[0])) / 60) + 1)
                raise QuotaError(f"You have added {self.per_client} images in the last {self.window_s / 60:.0f} "
                                 f"minutes, the limit per visitor (--max-adds-per-client); try again in "
                                 f"{wait_min} min.")
            recent.append(now)
            self.added += 1
            if len(self._recent) > 10_000:  # forget clients whose window has passed
                self._recent = {c: q for c, q in self._recent.items() if q and now - q[-1] < self.window_s}

    def give_back(self, client: str) -> None:
        """Undo ``take`` for an add that did not happen (bad image, server down)."""
        with self._lock:
            recent = self._recent.get(client)
            if recent:
                recent.pop()
                self.added = max(0, self.added - 1)


UPLOADS_PREFIX = "ascl-demo-uploads-"
_own_uploads: Path | None = None


def upload_folder() -> Path:
    """This process's folder for uploads and thumbnails: ``$GRADIO_TEMP_DIR`` when set (Gradio reads
    it), else a fresh temporary folder that this call sets it to. Folders that a killed page left
    behind (their process is gone) are removed first."""
    global _own_uploads
    given = os.environ.get("GRADIO_TEMP_DIR")
    if given and (_own_uploads is None or given == str(_own_uploads)):
        return Path(given)
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{UPLOADS_PREFIX}*"):
        pid = old.name[len(UPLOADS_PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    _own_uploads = Path(tempfile.mkdtemp(prefix=f"{UPLOADS_PREFIX}{os.getpid()}-"))
    os.environ["GRADIO_TEMP_DIR"] = str(_own_uploads)
    atexit.unregister(remove_upload_folder)
    atexit.register(remove_upload_folder)  # also when the page is not stopped by its own code
    return _own_uploads


def remove_upload_folder() -> None:
    """Delete the folder ``upload_folder`` made (a folder the user named is left alone)."""
    global _own_uploads
    if _own_uploads is None:
        return
    shutil.rmtree(_own_uploads, ignore_errors=True)
    if os.environ.get("GRADIO_TEMP_DIR") == str(_own_uploads):
        del os.environ["GRADIO_TEMP_DIR"]
    _own_uploads = None
