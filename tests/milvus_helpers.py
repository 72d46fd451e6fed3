"""A real Milvus standalone server for the tests (the PyPI ``milvus`` package), on free ports, data under tmp.

``MilvusProcess`` starts ``milvus run standalone`` (bundled by ``milvus`` 2.3.5) with every port
it listens on chosen free, can stop it and start it again on the same ports and data (an
outage), and is stopped by the session fixture ``milvus_server`` (in conftest.py). Where the
server cannot start, the fixture skips with the reason, and the contract tests fall back to
Milvus Lite (``milvus+lite://``), which needs no server.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

PORT_KEYS = ("etcd_port", "root_coord_port", "proxy_port", "proxy_internal_port", "query_coord_port",
             "query_node_port", "index_coord_port", "index_node_port", "data_coord_port", "data_node_port",
             "etcd_peer_port")
START_TIMEOUT_S = 180.0


def _free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(int(s.getsockname()[1]))
    for s in sockets:
        s.close()
    return ports


class MilvusProcess:
    """One real Milvus standalone server: ``start``, ``stop`` (an outage), ``start`` again, ``close``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="ascl-milvus-"))
        self.ports = dict(zip(PORT_KEYS, _free_ports(len(PORT_KEYS)), strict=True))
        self.server: Any = None
        self.version = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['proxy_port']}"

    def spec(self, collection: str) -> str:
        return f"milvus://{self.address}/{collection}"

    def start(self) -> MilvusProcess:
        from milvus import MilvusServer, MilvusServerConfig, __version__

        etcd_config = self._embedded_etcd_config()

        class Config(MilvusServerConfig):  # type: ignore[misc]
            def load_template(self) -> None:
                """The package's template (and glog.conf), pointing embedded etcd at ``etcd_config``."""
                super().load_template()
                self.template_text = with_etcd_config(self.template_text, etcd_config)

            def try_bind_port(self, port: int) -> socket.socket | None:
                """As the server binds (SO_REUSEADDR): a port in TIME_WAIT after a stop is free again."""
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
                    return sock
                except OSError:
                    sock.close()
                    return None

        config = Config(data_dir=str(self.root), **{k: v for k, v in self.ports.items() if k != "etcd_peer_port"})
        self.server = MilvusServer(config, wait_for_started=False)
        self.server.start()
        self.version = __version__
        self.server.wait_started(timeout=int(START_TIMEOUT_S * 1000))
        deadline = time.monotonic() + 60
        while True:  # the health page answers a moment before the proxy takes clients
            try:
                from pymilvus import MilvusClient

                client = MilvusClient(uri=f"http://{self.address}", timeout=5, dedicated=True)
                client.list_collections()
                client.close()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _embedded_etcd_config(self) -> Path:
        """A config file for Milvus's embedded etcd with a peer port of ours. Left at etcd's default
        (2380), a second server on the machine (say, one test's own beside the session's) fails with
        "bind: address already in use"."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "embedded-etcd.yaml"
        peer = f"http://127.0.0.1:{self.ports['etcd_peer_port']}"
        client = f"http://127.0.0.1:{self.ports['etcd_port']}"
        path.write_text(
            f"name: default\nlisten-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: default={peer}\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n")
        return path

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL): its clients now meet an unreachable Milvus."""
        if self.server is not None:
            proc = self.server.server_proc
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except Exception:
                    proc.kill()
                    proc.wait(timeout=10)
                self.server.server_proc = None
            self.server.stop()
            self.server = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def with_etcd_config(template: str, etcd_config: Path) -> str:
    """The milvus package's config template with ``etcd.config.path`` set (its template has no such item)."""
    anchor = "  use:\n    embed: true"
    if anchor not in template:
        raise RuntimeError("the milvus package's config template changed: no 'etcd: use: embed: true' to anchor "
                           "the embedded-etcd config file to")
    return template.replace(anchor, f"  config:\n    path: {etcd_config}\n{anchor}", 1)


def collection_name(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def drop(spec: str) -> None:
    from ascl.serving.collections.milvus_index import drop_index

    with contextlib.suppress(Exception):
        drop_index(spec)
