"""``ascl serve`` as a service: Triton on private ports, the front door on the public ones, a supervisor.

- The front door (``ascl.serving.online.front_door``) holds the public gRPC and HTTP ports for the
  service's whole life and forwards the inference API only, with request-size limits.
- Triton (``ascl.serving.online.server``) runs on free 127.0.0.1 ports with its control APIs behind an
  admin key; its metrics listen on the public metrics port.
- The supervisor checks every second that Triton and its backend stubs are alive and, every few
  seconds, that a real search goes through the search model. A stub can die while the
  server stays up; Triton may start a new one, but requests that were inside the dead one never
  answer. When any check fails it kills Triton and starts a new one on the same repository and index,
  logging why; the front door makes requests that arrive meanwhile wait, so a client sees at
  most the requests that were inside the dead server fail, with UNAVAILABLE. A probe answered with
  ``INDEX_UNAVAILABLE`` (the index's server, e.g. Milvus, is down) counts as a working Triton: its
  searches answer UNAVAILABLE until that server is back, without a restart.
- Busy is not hung: a probe or liveness check that times out while the front door keeps getting
  Triton's answers to clients' requests (a flood, a slow CPU) restarts nothing, since a restart
  would fail every request inside Triton and cure none.
- ``stop()`` drains: the front door refuses new requests (UNAVAILABLE) and lets those in flight
  finish, then Triton gets SIGTERM with nothing left inside it.
"""

from __future__ import annotations

import functools
import io
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ascl.serving.online.front_door import Backend, FrontDoor
from ascl.serving.online.limits import Limits
from ascl.serving.online.request_errors import INDEX_UNAVAILABLE
from ascl.serving.online.server import ServerUrls, TritonServer, check_ports_free, exit_status

DEADLINE = "DEADLINE_EXCEEDED"  # how a probe that waited its whole timeout fails


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_descriptors(count: int = 16) -> None:
    """OSError (EMFILE) unless ``count`` more file descriptors can be opened now: a check that
    needs sockets, pipes and /proc must not mistake a flood of client connections for a dead server."""
    opened: list[int] = []
    try:
        for _ in range(count):
            opened.append(os.open(os.devnull, os.O_RDONLY))
    finally:
        for fd in opened:
            os.close(fd)


@functools.lru_cache(maxsize=1)
def probe_image() -> bytes:
    """A tiny PNG that every model of the search path can handle."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Supervision:
    """How often and how hard the supervisor checks Triton, and when it gives up."""

    check_every_s: float = 1.0  # process alive, not stopped, stubs alive, liveness endpoint answers?
    probe_every_s: float = 3.0  # a real search through preprocess, encoder and search
    probe_timeout_s: float = 15.0  # generous: under full load a probe waits behind real requests
    failures_before_restart: int = 2
    live_timeout_s: float = 2.0  # the liveness endpoint answers within this, even under load
    hung_after_s: float = 10.0  # no liveness answer for this long (or stopped, SIGSTOP): restart
    stopped_after_s: float = 2.0  # a stopped process (state T) for this long: restart
    start_attempts: int = 3
    give_up_after_s: float = 300.0  # the supervisor's own checks failing this long: the service stops


@dataclass
class ServiceEvents:
    """What happened, for logs and tests."""

    restarts: int = 0
    reasons: list[str] = field(default_factory=list)


class SearchService(ServerUrls):
    """The embedded image-search service on ``host``: gRPC, HTTP and metrics ports."""

    def __init__(
        self, repository: str | Path, *, host: str = "127.0.0.1", grpc_port: int = 8001, http_port: int = 8000,
        metrics_port: int = 8002, limits: Limits | None = None, admin_key: str | None = None,
        log_path: str | Path | None = None, verbose: bool = False, start_timeout_s: float = 180.0,
        supervision: Supervision | None = None, log: Callable[[str], None] | None = None,
    ) -> None:
        self.repository = Path(repository)
        self.host = self.metrics_host = host
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.limits = limits or Limits()
        self.admin_key = admin_key
        self.log_path = log_path
        self.verbose = verbose
        self.start_timeout_s = start_timeout_s
        self.supervision = supervision or Supervision()
        self.log = log or (lambda text: print(text, flush=True))
        self.events = ServiceEvents()
        self.triton: TritonServer | None = None
        self.front = FrontDoor(host, grpc_port, http_port, self.limits, log=self.log)
        self._wake = threading.Event()  # set by the front door when Triton refused a connection
        self.front.on_unreachable = self._wake.set
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._supervisor: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> SearchService:
        """Open the ports, start Triton and the supervisor; returns once Triton reports every model ready."""
        check_ports_free(self.ports, self.host)
        self.front.start()
        try:
            self._start_triton()
        except BaseException:
            self.front.stop(0)
            raise
        self._supervisor = threading.Thread(target=self._supervise_guarded, name="triton-supervisor", daemon=True)
        self._supervisor.start()
        return self

    def _start_triton(self) -> None:
        """A fresh Triton on free private ports, then the front door points at it."""
        triton = TritonServer(  # gRPC and HTTP private on 127.0.0.1; metrics where the service listens
            self.repository, grpc_port=free_local_port(), http_port=free_local_port(),
            metrics_port=self.ports["metrics"], host="127.0.0.1", metrics_host=self.host,
            log_path=self.log_path, verbose=self.verbose, admin_key=self.admin_key,
        )
        triton.start(self.start_timeout_s)
        self.admin_key = triton.admin_key
        with self._lock:
            self.triton = triton
        self.front.set_backend(Backend(f"127.0.0.1:{triton.ports['grpc']}", f"http://127.0.0.1:{triton.ports['http']}"))

    def stop(self, grace_s: float = 30.0) -> None:
        """Drain the front door (in-flight requests finish, new ones get UNAVAILABLE), then stop Triton."""
        if self._stopping.is_set():
            self._stopped.wait(grace_s + 60)
            return
        self._stopping.set()
        self._wake.set()
        try:
            self.front.stop(grace_s)
        finally:
            with self._lock:
                triton, self.triton = self.triton, None
            if triton is not None:
                triton.stop()
            if self._supervisor is not None:
                self._supervisor.join(10)
            self._stopped.set()

    def wait(self, timeout_s: float | None = None) -> str | None:
        """Block until the service stopped (or ``timeout_s`` passed); returns why the service gave up,
        if it did: Triton could not be restarted, or the supervisor could not keep watching it."""
        self._stopped.wait(timeout_s)
        return self._failure

    def __enter__(self) -> SearchService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ supervision

    def probe(self) -> str | None:
        """One search through Triton's private gRPC port; None when it answered (or was refused
        because Triton's queues are full: busy, not broken), else why not."""
        import numpy as np
        import tritonclient.grpc as grpcclient

        from ascl import names

        triton = self.triton
        if triton is None or not triton.is_alive():
            return _exited(triton)
        image = grpcclient.InferInput(names.IMAGE_BYTES, [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[probe_image()]], dtype=np.object_))
        k = grpcclient.InferInput(names.TOP_K, [1, 1], "INT32")
        k.set_data_from_numpy(np.array([[1]], dtype=np.int32))
        try:
            with grpcclient.InferenceServerClient(f"127.0.0.1:{triton.ports['grpc']}") as client:
                client.infer(names.MODEL_IMAGE_SEARCH, [image, k], client_timeout=self.supervision.probe_timeout_s)
        except Exception as exc:  # any failure of the probe is a finding, reported in the restart reason
            if not triton.is_alive():  # it died while the probe was out: say so, not "connection refused"
                return _exited(triton)
            text = str(exc).strip()
            if "maximum queue size" in text.lower():  # full, and saying so: it answers
                return None
            if INDEX_UNAVAILABLE in text:  # Triton answered: the index's server is down, not Triton
                return None
            return f"a probe search failed ({text.splitlines()[0][:300] if text else type(exc).__name__})"
        return None

    def _supervise_guarded(self) -> None:
        try:
            self._supervise()
        except BaseException as exc:  # a bug of our own: the service must not run on unwatched
            self._give_up(f"the supervisor stopped on an error ({type(exc).__name__}: {exc})")
            raise

    def _supervise(self) -> None:
        """The supervisor thread: checks until ``stop()``. Its own errors (out of descriptors, a
        /proc that cannot be read) are logged at a bounded rate and checked again; if they last
        ``give_up_after_s`` the service stops with the reason (``wait()`` returns it)."""
        watch = _Watch()
        failing_since: float | None = None
        while not self._stopping.is_set():
            woken = self._wake.wait(self.supervision.check_every_s)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._check(watch, woken)
                failing_since = None
            except Exception as exc:  # never a silent dead thread: log, keep watching, or give up with the reason
                now = time.monotonic()
                failing_since = failing_since or now
                reason = f"{type(exc).__name__}: {exc}"
                self._log_bounded("supervisor-error", f"supervisor: a check failed ({reason}); checking again")
                if now - failing_since > self.supervision.give_up_after_s:
                    self._give_up(f"the supervisor's checks kept failing for {now - failing_since:.0f} s ({reason})")
                    return
                time.sleep(min(5.0, self.supervision.check_every_s))

    def _check(self, watch: _Watch, woken: bool) -> None:
        """One round of checks; restarts Triton when one says it is dead, stopped, hung or broken."""
        sup = self.supervision
        ensure_descriptors()  # out of them, every check below would fail and look like a broken Triton
        now = time.monotonic()
        triton = self.triton
        dead = triton is None or not triton.is_alive()
        if not dead and triton is not None:
            lost = triton.lost_stubs()
            if lost:
                self._restart(f"backend stub {sorted(lost)} exited")
                watch.reset()
                return
            if triton.state() in ("T", "t"):  # SIGSTOP (or a debugger): it answers nothing, ever
                watch.stopped_since = watch.stopped_since or now
                if now - watch.stopped_since >= sup.stopped_after_s:
                    self._restart(f"tritonserver is stopped (process state T, e.g. SIGSTOP) for "
                                  f"{now - watch.stopped_since:.0f} s")
                    watch.reset()
                return
            watch.stopped_since = None
            answered, watch.answered = watch.answered, self.front.answered
            # a liveness check that times out while clients' requests are answered: busy, not hung
            if triton.is_live(sup.live_timeout_s) or watch.answered != answered:
                watch.silent_since = None
            else:
                watch.silent_since = watch.silent_since or now
                if now - watch.silent_since >= sup.hung_after_s:
                    self._restart(f"tritonserver did not answer its liveness check for {now - watch.silent_since:.0f} s")
                    watch.reset()
                    return
        if not (dead or woken) and now - watch.last_probe < sup.probe_every_s:
            return
        watch.last_probe = now
        answered = self.front.answered
        reason = self.probe()
        if self._stopping.is_set():
            return
        if reason and DEADLINE in reason and not dead and self.front.answered != answered:
            # the probe waited its whole timeout while Triton answered clients: a flood keeps it (or
            # this process) busy. Restarting would fail every request inside it and help none.
            self._log_bounded("probe-slow", f"supervisor: {reason}, but Triton kept answering requests "
                                            f"({self.front.answered - answered} meanwhile); not restarting")
            reason = None
        watch.failures = watch.failures + 1 if reason else 0
        if reason and (dead or watch.failures >= sup.failures_before_restart):
            self._restart(reason)
            watch.reset()

    def _log_bounded(self, kind: str, text: str) -> None:
        self.front.log(kind, text)

    def _restart(self, reason: str) -> None:
        self.events.restarts += 1
        self.events.reasons.append(reason)
        self.log(f"supervisor: {reason}; restarting tritonserver (restart {self.events.restarts}) ...")
        began = time.monotonic()
        self.front.set_backend(None)  # new requests wait at the front door
        with self._lock:
            broken, self.triton = self.triton, None
        if broken is not None:
            broken.stop(kill=True)
            if broken.last_errors:
                self.log("supervisor: the stopped tritonserver's last errors:\n" + broken.last_errors)
        last = ""
        for attempt in range(1, self.supervision.start_attempts + 1):
            if self._stopping.is_set():
                return
            try:
                self._start_triton()
            except Exception as exc:  # ServerError, or the machine's own (out of descriptors, memory)
                text = str(exc).strip()
                last = text.splitlines()[-1][:500] if text else type(exc).__name__
                self.log(f"supervisor: start attempt {attempt} failed: {text[-3000:] or last}")
                time.sleep(min(10.0, 2.0 * attempt))
                continue
            self.log(f"supervisor: tritonserver is serving again after {time.monotonic() - began:.1f} s")
            return
        self._give_up(f"tritonserver could not be restarted after {self.supervision.start_attempts} attempts "
                      f"({reason}); last attempt: {last}")

    def _give_up(self, failure: str) -> None:
        """Stop the service for good: ``wait()`` returns ``failure`` (``ascl serve`` / ``ascl up`` exit 1 with it)."""
        self._failure = failure
        self.log(f"supervisor: {failure}; stopping")
        threading.Thread(target=self.stop, name="service-stop", daemon=True).start()


def _exited(triton: TritonServer | None) -> str:
    """The probe's finding for a Triton that is gone: ``tritonserver exited (killed by SIGSEGV)``."""
    process = None if triton is None else triton.process
    return f"tritonserver exited ({exit_status(None if process is None else process.returncode)})"


@dataclass
class _Watch:
    """What the supervisor remembers between checks."""

    failures: int = 0  # probe failures in a row
    last_probe: float = field(default_factory=time.monotonic)
    stopped_since: float | None = None
    silent_since: float | None = None
    answered: int = 0  # the front door's count of Triton's answers at the last check

    def reset(self) -> None:
        self.failures, self.last_probe, self.stopped_since, self.silent_since = 0, time.monotonic(), None, None
