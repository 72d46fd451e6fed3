"""Serving: FAISS index, Triton model repository, gRPC/HTTP clients.

``Client``, ``Hit`` and ``TritonServer`` are imported lazily so that importing this package
(the CLI, the Triton models that vendor it) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Client", "Hit", "TritonServer"]

if TYPE_CHECKING:
    from ascl.serving.collections.index import Hit
    from ascl.serving.online.client import Client
    from ascl.serving.online.server import TritonServer


def __getattr__(name: str) -> Any:
    if name == "Client":
        from ascl.serving.online.client import Client

        return Client
    if name == "Hit":
        from ascl.serving.collections.index import Hit

        return Hit
    if name == "TritonServer":
        from ascl.serving.online.server import TritonServer

        return TritonServer
    raise AttributeError(f"module 'ascl.serving' has no attribute {name!r}")
