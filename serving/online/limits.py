"""What clients may claim of ``ascl serve``'s service, one request and all of them together.

Only the standard library: ``ascl serve --help`` reads the defaults from here without loading
the service. The front door (``front_door``) enforces ``Limits``; Triton's model queues are
bounded by ``MAX_QUEUE_SIZE`` (``repository``). The defaults leave ordinary load (tens of
concurrent requests) untouched.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, replace

FD_RESERVE = 192  # descriptors kept for everything but client connections (Triton links, logs, pipes, /proc)
# Requests that may wait in one Triton model's queue; more are refused at once with UNAVAILABLE (HTTP
# 503, "Exceeds maximum queue size") instead of waiting without bound. The front door's in-flight
# limit keeps the embedded server below it; it is the backpressure of a production repository,
# where no front door runs.
MAX_QUEUE_SIZE = 512


@dataclass(frozen=True)
class Limits:
    """What one client, one request and all of them together may claim at the front door.

    The defaults leave ordinary load untouched (the benchmarks run up to 32 concurrent requests);
    ``ascl serve --help`` names the flag of each.
    """

    max_request_bytes: int = 64 * 1024 * 1024  # one request as sent, and once inflated (64 images of 1 MiB)
    backend_wait_s: float = 30.0  # how long a request waits for a restarting Triton
    max_in_flight: int = 256  # inference requests inside the service at once; more: UNAVAILABLE / 503
    max_connections: int = 1024  # open connections per port; more are closed at once
    idle_timeout_s: float = 60.0  # a connection with no request in flight is closed after this
    header_timeout_s: float = 10.0  # a new connection's first request (headers; gRPC: its handshake)
    body_timeout_s: float = 60.0  # an HTTP request body must arrive within this
    max_streams: int = 1024  # concurrent HTTP/2 streams (calls) on one gRPC connection

    def within_descriptors(self, reserve: int = FD_RESERVE) -> Limits:
        """These limits with ``max_connections`` lowered so that both ports' connections and
        ``reserve`` fit the process's descriptor limit (raised toward its hard limit first)."""
        wanted = 2 * self.max_connections + reserve
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
            except (ValueError, OSError):
                pass
        if soft == resource.RLIM_INFINITY or soft >= wanted:
            return self
        return replace(self, max_connections=max(1, (soft - reserve) // 2))
