"""Serving replicas that share one Milvus collection, with the real server, ``ascl serve`` and ``tritonserver``.

Two ``ascl serve`` processes search one collection: an image added by a writer (the one add path,
``add_image_bytes``) is found by both without a restart, and a removal is seen by both. When the
Milvus server goes away, a search answers UNAVAILABLE within seconds (Triton is not restarted for
it), and both replicas answer again once Milvus is back. This test starts its own Milvus server,
since it stops it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from milvus_helpers import MilvusProcess
from serving_helpers import export_random_encoder, png_bytes, serve_until_ready, stop

pytest.importorskip("pymilvus", reason="the Milvus client is an extra: pip install 'ascl-hub[milvus]'")
pytest.importorskip("milvus", reason="the Milvus server package is a dev extra: pip install 'ascl-hub[dev]'")

pytestmark = [pytest.mark.slow, pytest.mark.triton]


def eventually(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``check()`` until it returns something truthy (or ``timeout_s``: AssertionError with the last error)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except Exception as exc:  # the server may refuse while it catches up
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s:.0f} s (last error: {last})")


def test_replicas_share_one_collection_and_survive_an_outage(tmp_path: Path, digits_folder: Path) -> None:
    from ascl.serving.collections.build import build_index
    from ascl.serving.collections.changes import add_image_bytes, remove_images
    from ascl.serving.online.client import Client

    server = MilvusProcess(tmp_path / "milvus")
    try:
        server.start()
    except Exception as exc:
        server.close()
        pytest.skip(f"the real Milvus server (PyPI milvus) could not start here: {str(exc)[:300]}")
    replicas: list[subprocess.Popen[str]] = []
    try:
        spec = server.spec("gallery")
        onnx = export_random_encoder(tmp_path / "encoder.onnx")
        build_index(onnx, str(digits_folder), spec, progress=False)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        urls = []
        for _ in range(2):
            grpc = free_port()
            proc, lines = serve_until_ready(["--model", str(onnx), "--index", spec, "--grpc-port", str(grpc),
                                             "--http-port", str(free_port()), "--metrics-port", str(free_port())], env)
            replicas.append(proc)
            urls.append(f"127.0.0.1:{grpc}")
        clients = [Client(url, timeout_s=30) for url in urls]

        image = png_bytes(seed=7)
        (new_id,) = add_image_bytes(spec, onnx, [("new.png", image)], label="added")
        for client in clients:  # every replica finds it, without a restart
            top = eventually(lambda c=client: [h for h in c.search([image], k=1)[0] if h.id == new_id], 30,
                             "a replica found the added image")
            assert top[0].label == "added" and top[0].score > 0.999
        remove_images(spec, [new_id])
        for client in clients:
            eventually(lambda c=client: new_id not in [h.id for h in c.search([image], k=3)[0]], 30,
                       "a replica stopped finding the removed image")

        server.stop()  # Milvus goes away under running replicas
        began = time.monotonic()
        with pytest.raises(Exception, match="UNAVAILABLE") as info:
            clients[0].search([image], k=3)
        assert time.monotonic() - began < 20, "a search during the outage should fail within seconds"
        assert "Traceback" not in str(info.value)
        time.sleep(8)  # longer than two supervisor probes: Triton must not be restarted for Milvus
        server.start()
        for client in clients:
            eventually(lambda c=client: len(c.search([image], k=3)[0]) == 3, 90, "a replica answered again")
        for proc in replicas:
            assert proc.poll() is None, "a replica exited"
    finally:
        for proc in replicas:
            output = []
            stop(proc)
            if proc.stdout is not None:
                output = proc.stdout.read().splitlines()
            assert not [line for line in output if "restarting tritonserver" in line], output[-20:]
        server.close()
