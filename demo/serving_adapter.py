"""The two things the demo needs from ``ascl.serving``, behind one narrow seam.

``build_index`` embeds a folder of gallery images into an index folder; ``start_triton``
writes the model repository for an ONNX file and an index and starts ``tritonserver``.
Keeping these calls here means a change in the serving API touches one file of the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ascl.demo.up import Ports


class RunningServer(Protocol):
    """A started search service; ``stop`` returns once Triton and its stubs are gone."""

    def stop(self) -> None: ...


def build_index(onnx_path: Path, images: Path, index_dir: Path, *, factory: str = "auto") -> int:
    """Embed every image under ``images`` with ``onnx_path`` into a new index at ``index_dir``.

    Unreadable images are skipped with a warning (a gallery folder is rarely perfectly clean).
    Returns the number of images in the index.
    """
    from ascl.serving.build import build_index as serving_build_index

    return serving_build_index(onnx_path, str(images), index_dir, factory=factory).total


def start_triton(onnx_path: Path, index_dir: Path, ports: Ports, cache: Path) -> RunningServer:
    """Write the embedded model repository under ``cache`` and start the search service on ``ports``.

    Returns once a search goes through. The service is ``ascl serve``'s: Triton behind the
    front door (inference, health and metadata only; bounded requests), restarted by its
    supervisor if it or a stub dies. The repository's search model reads ``index_dir`` in
    place, so images added to that index are served without a restart.
    """
    from ascl.serving.repository import write_repository
    from ascl.serving.service import SearchService

    repository = write_repository(cache / "triton" / index_dir.name, onnx_path, index_dir)
    service = SearchService(repository, grpc_port=ports.grpc, http_port=ports.http, metrics_port=ports.metrics,
                            log_path=cache / "triton" / f"{index_dir.name}.log")
    return service.start()
