"""The gallery service (``ascl.serving.online.gallery``): one protocol, two implementations, one writer.

The in-process tests need no server; the Triton tests share one real ``tritonserver`` (started
once for the module) over the same index folder that an ``InProcessGallery`` reads, so both
implementations answer on the very same gallery.
"""

from __future__ import annotations

import ast
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from serving_helpers import png_bytes, processes_mentioning

from ascl.errors import FAILURE, USAGE, AsclError
from ascl.images import ImageError, list_images
from ascl.serving.collections.faiss_index import GalleryIndex, manifest_version
from ascl.serving.online import gallery
from ascl.serving.online.gallery import (
    ADDED_FOLDER,
    GalleryService,
    Hit,
    InProcessGallery,
    PortInUseError,
    TritonGallery,
    add_images,
    check_ports_free,
    index_count,
    index_records,
)

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ("description", "embed", "search", "add", "remove", "count")


@pytest.fixture(scope="module")
def built(random_onnx: Path, digits_index: Path) -> tuple[Path, Path]:
    """(ONNX file, index folder) of a small real gallery: the session's 120 digits with a random
    encoder (conftest.py); every test here works on a copy of the index."""
    assert index_count(digits_index) == 120
    return random_onnx, digits_index


@pytest.fixture()
def local(built: tuple[Path, Path], tmp_path: Path) -> InProcessGallery:
    """An in-process gallery over a private copy of the index (changes stay in the test)."""
    shutil.copytree(built[1], tmp_path / "idx")
    return InProcessGallery(built[0], tmp_path / "idx")


def _ids(results: list[Hit]) -> list[int]:
    return [r.id for r in results]


# ---------------------------------------------------------------------------- in process, no server


def test_in_process_answers_the_protocol(local: InProcessGallery, digits_folder: Path) -> None:
    service: GalleryService = local
    assert all(hasattr(service, name) for name in PROTOCOL)
    files = list_images(digits_folder)[:3]
    images = [f.read_bytes() for f in files]
    vectors = service.embed(images)
    assert vectors.shape == (3, local.index.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    one = service.search(images[0], 4)
    many = service.search(images, 4)
    assert len(one) == 4 and [_ids(r) for r in many][0] == _ids(one)
    assert [r[0].file for r in many] == files and one[0].score == pytest.approx(1.0, abs=1e-4)
    assert service.count() == 120 == index_count(local.index_dir)
    assert len(service.search(images[0], 500)) == 120  # k is clamped to the gallery size


def test_add_search_dedupe_remove_in_process(local: InProcessGallery) -> None:
    new = png_bytes(5)
    added = local.add(new, name="Noise.PNG", label="  my\tnoise ")
    assert (added.label, added.file) == ("my noise", (local.index_dir / ADDED_FOLDER).resolve() / added.name)
    assert added.file is not None and added.file.read_bytes() == new and added.name.endswith(".png")
    assert local.count() == 121 and local.search(new, 1)[0].id == added.id
    version = manifest_version(local.index_dir)
    again = local.add(new, name="other.png", label="other")
    assert (again.id, again.label) == (added.id, "my noise")  # same bytes: one id, the first label
    assert local.count() == 121 and manifest_version(local.index_dir) == version  # nothing written
    assert local.remove([added.id, 10_000]) == 1 and local.count() == 120
    assert added.id not in _ids(local.search(new, 10))
    assert local.remove([added.id]) == 0 and manifest_version(local.index_dir) == version + 1


def test_add_images_writes_once_for_duplicates_and_nothing_for_bad_bytes(local: InProcessGallery) -> None:
    a, b = png_bytes(1), png_bytes(2)
    done = add_images(local.index_dir, [("a.png", a), ("b.jpg", b), ("a-again.png", a)], local.embed, label="x")
    assert done.new == [True, True, False] and done.total == 122
    assert done.results[0].id == done.results[2].id != done.results[1].id
    assert sorted(p.name for p in (local.index_dir / ADDED_FOLDER).iterdir()) == sorted(
        r.name for r in done.results[:2])
    version = manifest_version(local.index_dir)
    with pytest.raises(ImageError, match="bad.png"):
        add_images(local.index_dir, [("c.png", png_bytes(3)), ("bad.png", b"not an image")], local.embed)
    assert manifest_version(local.index_dir) == version and local.count() == 122
    assert {r.id for r in index_records(local.index_dir)} >= {r.id for r in done.results}


def test_labels_and_missing_index_folder_are_asclerrors(local: InProcessGallery) -> None:
    with pytest.raises(ValueError, match="at most 64 characters") as info:
        local.add(png_bytes(9), name="x.png", label="x" * 65)
    assert isinstance(info.value, AsclError) and info.value.exit_code == USAGE
    with pytest.raises(RuntimeError, match="--index") as missing:
        TritonGallery(f"127.0.0.1:{free_port()}").add(png_bytes(9), name="x.png")
    assert isinstance(missing.value, AsclError)
    assert TritonGallery(f"127.0.0.1:{free_port()}").count() == -1


def test_error_classes_derive_from_asclerror() -> None:
    from ascl.demo.search import UserError
    from ascl.serving.collections.index import IndexBusyError, IndexConflictError, IndexFileError
    from ascl.serving.online.request_errors import RequestError
    from ascl.serving.online.server import ServerError

    for cls, builtin in ((IndexFileError, ValueError), (IndexBusyError, ValueError), (IndexConflictError, ValueError),
                         (RequestError, ValueError), (ServerError, RuntimeError), (PortInUseError, RuntimeError),
                         (gallery.AddNotServedError, TimeoutError), (UserError, Exception)):
        assert issubclass(cls, AsclError) and issubclass(cls, builtin), cls
    assert ServerError.exit_code == FAILURE and PortInUseError.exit_code == USAGE
    assert gallery.ServerError is ServerError


def test_port_check_names_the_flag() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} \\(--grpc-port\\) is in use") as info:
            check_ports_free({"--port": free_port(), "--grpc-port": port})
    assert (info.value.name, info.value.port) == ("--grpc-port", port)
    same = free_port()
    with pytest.raises(PortInUseError, match="--port, --grpc-port and --http-port must all differ"):
        check_ports_free({"--port": same, "--grpc-port": free_port(), "--http-port": same})


def _serving_imports(path: Path) -> list[str]:
    """Every ``ascl.serving*`` / ``ascl.export*`` module that ``path`` imports (at any depth)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "ascl" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [n for n in names if n.split(".")[:2] in (["ascl", "serving"], ["ascl", "export"])]
    return found


# demo/cli.py is a CLI module: it sits on top of every layer (README, Architecture) and reads
# serving's option help texts for --precision; the demo's code talks to the gallery service only,
# and what starts a service (up.py, cli.py's --in-process) takes the one serve path.
CLI_HELP_TEXTS = {"cli.py": {"ascl.serving.online.precision", "ascl.serving.online.serve"},
                  "up.py": {"ascl.serving.online.serve"}}


def test_demo_uses_only_the_gallery_seam() -> None:
    files = sorted((ROOT / "demo").glob("*.py"))
    assert {"up.py", "cli.py", "search.py", "app.py"} <= {f.name for f in files}
    for path in files:
        allowed = {"ascl.serving.online.gallery"} | CLI_HELP_TEXTS.get(path.name, set())
        stray = sorted(set(_serving_imports(path)) - allowed)
        assert stray == [], f"demo/{path.name} goes around ascl.serving.online.gallery: {stray}"


def test_gallery_module_imports_only_serving_the_export_runtime_and_cache_and_core() -> None:
    tree = ast.parse((ROOT / "serving" / "online" / "gallery.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    ascl_modules = {m for m in modules if m == "ascl" or m.startswith("ascl.")}
    higher = {m for m in ascl_modules if m.split(".")[1:2] in (["demo"], ["training"], ["model_cards"])}
    assert higher == set()
    assert {m for m in ascl_modules if m.startswith("ascl.export")} <= {"ascl.export.runtime", "ascl.export.cache"}


# ---------------------------------------------------------------------------- Triton and in-process, one gallery


@dataclass
class Both:
    triton: TritonGallery
    local: InProcessGallery
    index: Path


@pytest.fixture(scope="module")
def both(built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Both]:
    from ascl.serving import TritonServer
    from ascl.serving.online.repository import write_repository

    root = tmp_path_factory.mktemp("gallery-triton")
    shutil.copytree(built[1], root / "idx")
    repo = write_repository(root / "models", built[0], root / "idx")
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    try:
        server.start()
        yield Both(TritonGallery(server.grpc_url, root / "idx"), InProcessGallery(built[0], root / "idx"), root / "idx")
    finally:
        server.stop()
    assert processes_mentioning(str(repo)) == []


@pytest.mark.triton
def test_triton_and_in_process_answer_alike(both: Both, digits_folder: Path) -> None:
    images = [f.read_bytes() for f in list_images(digits_folder)[::13]]  # 10 queries, every digit
    for service in (both.triton, both.local):
        assert all(hasattr(service, name) for name in PROTOCOL)
    np.testing.assert_allclose(both.triton.embed(images), both.local.embed(images), atol=1e-4)
    remote, here = both.triton.search(images, 5), both.local.search(images, 5)
    assert [_ids(r) for r in remote] == [_ids(r) for r in here]
    assert [[r.label for r in row] for row in remote] == [[r.label for r in row] for row in here]
    assert [r.file for r in remote[0]] == [r.file for r in here[0]]
    assert _ids(both.triton.search(images[3], 5)) == _ids(here[3])
    assert both.triton.count() == both.local.count() == 120
    assert "Triton" in both.triton.description


@pytest.mark.triton
def test_triton_add_is_served_at_once_dedupes_and_removes(both: Both) -> None:
    new = png_bytes(21)
    added = both.triton.add(new, name="fresh.png", label="fresh")
    assert both.triton.search(new, 1)[0].id == added.id  # no wait: add returned once the server had it
    assert both.local.search(new, 1)[0].id == added.id  # the same folder, read in process
    assert both.triton.count() == both.local.count() == 121
    again = both.triton.add(new, name="fresh-again.png", label="other")
    assert again.id == added.id and both.triton.count() == 121
    assert both.triton.remove([added.id]) == 1  # returns once the server no longer finds it
    assert added.id not in _ids(both.triton.search(new, 10))
    assert added.id not in _ids(both.local.search(new, 10))
    assert both.triton.count() == both.local.count() == 120
    assert len(GalleryIndex.load(both.index).metadata) == 120
