"""The one port check of the commands that start a service (``ascl serve``, ``ascl up``).

Called once, before any slow step, with each port under the command-line flag that sets it, so
that the error names the flag to change. The probe itself is the server's
(``ascl.serving.online.server.check_ports_free``).
"""

from __future__ import annotations

from ascl.serving.online.server import PortInUseError
from ascl.serving.online.server import check_ports_free as _probe

__all__ = ["PortInUseError", "check_ports_free"]


def check_ports_free(ports: dict[str, int], host: str = "127.0.0.1") -> None:
    """Fail fast when a port is taken or two are the same.

    ``ports``: the command-line flag that sets each port (``--grpc-port``) -> port. Raises
    PortInUseError (a ServerError, exit 2) naming the flag to change.
    """
    try:
        _probe(ports, host)
    except PortInUseError as exc:
        raise PortInUseError(f"port {exc.port} ({exc.name}) is in use; stop what uses it or pass {exc.name} N",
                             name=exc.name, host=exc.host, port=exc.port) from exc
    if len(set(ports.values())) != len(ports):
        *rest, last = ports
        raise PortInUseError(f"{', '.join(rest)} and {last} must all differ")
