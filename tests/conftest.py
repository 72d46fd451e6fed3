"""The suite's rules and shared fixtures: isolation, markers, free ports, small real image sets.

Isolation. Before any test module is imported, ``ASCL_CACHE`` and ``HF_HOME`` point at a
temporary folder of this session (removed at its end), and the Hub settings a developer may
have exported (endpoint, token, cache paths, offline mode) are cleared, so no test reads or
writes the user's ``~/.cache/ascl`` or Hugging Face cache, or reaches the real Hub.
``huggingface_hub`` reads ``HF_HOME`` and ``HF_ENDPOINT`` when it is imported (at collection),
hence a session folder set in ``pytest_configure`` rather than one per test; per test it
would also export the shipped model again and rebuild the Triton stub's side environment
(``prepared_stub_env``: a pip install) in every test that serves. Two derived artefacts of the
developer's own cache are linked in read-only when present: that stub environment and the
decoded CIFAR-10 copy (both keyed by what they were made from). Tests that need an empty
cache make one with ``fresh_cache``.

Markers (``pyproject.toml``): ``triton`` (starts the real ``tritonserver``), ``browser``
(drives chromium), ``slow``, ``gpu``. The quick loop is ``pytest -m "not triton and not
browser"``. Marking cannot be forgotten: while a test runs, a watcher looks for new
``tritonserver`` and chromium processes below this one, and a test that started one without
its marker fails, naming the marker. Tests that use the shared session service are marked by
the fixture itself (``SERVER_FIXTURES``).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from ascl.serving.online.service import SearchService

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- isolation

ISOLATED = {"ASCL_CACHE": "ascl-cache", "HF_HOME": "hf-home"}  # variable -> folder under the session's home
CLEARED = ("HF_ENDPOINT", "HF_TOKEN", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE",
           "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_HUB_OFFLINE")
STUB_ENV_PREFIX = "triton-stub-env-"  # ascl.serving.online.server.prepared_stub_env's folder
DECODED_TARS = "cifar10-offline"  # ascl.image_sources.TAR_CACHE_FOLDER
_session_home: Path | None = None


def _link_derived(outer: Path, cache: Path) -> None:
    """Link the developer's prepared stub environment and decoded archives into the session cache."""
    for entry in sorted(outer.glob(f"{STUB_ENV_PREFIX}*")):
        if entry.is_dir() and not entry.is_symlink():
            (cache / entry.name).symlink_to(entry)
    if (outer / DECODED_TARS).is_dir():
        (cache / DECODED_TARS).mkdir()
        for entry in sorted((outer / DECODED_TARS).iterdir()):
            if entry.is_dir():
                (cache / DECODED_TARS / entry.name).symlink_to(entry)


def pytest_configure(config: pytest.Config) -> None:
    global _session_home
    outer = Path(os.environ.get("ASCL_CACHE") or Path.home() / ".cache" / "ascl").expanduser()
    _session_home = Path(tempfile.mkdtemp(prefix="ascl-tests-"))
    for variable, folder in ISOLATED.items():
        (_session_home / folder).mkdir()
        os.environ[variable] = str(_session_home / folder)
    for variable in CLEARED:
        os.environ.pop(variable, None)
    if outer.is_dir():
        _link_derived(outer, _session_home / ISOLATED["ASCL_CACHE"])


def pytest_unconfigure(config: pytest.Config) -> None:
    if _session_home is not None:
        shutil.rmtree(_session_home, ignore_errors=True)


def session_folder(variable: str) -> Path:
    """The session's folder for ``ASCL_CACHE`` or ``HF_HOME``."""
    assert _session_home is not None, "pytest_configure has not run"
    return _session_home / ISOLATED[variable]


@pytest.fixture(autouse=True)
def _isolated_environment() -> Iterator[None]:
    """Every test starts with the session's ``ASCL_CACHE`` and ``HF_HOME``; a test that changed them
    without ``monkeypatch`` fails, and the next one starts isolated all the same."""
    wanted = {variable: str(session_folder(variable)) for variable in ISOLATED}
    os.environ.update(wanted)
    yield
    changed = {v: os.environ.get(v) for v, value in wanted.items() if os.environ.get(v) != value}
    os.environ.update(wanted)
    assert not changed, f"the test left {changed} set: use monkeypatch.setenv, which puts them back"


def fresh_cache(path: Path) -> Path:
    """An empty ASCL cache at ``path`` but for what a Triton start prepares once (the backends folder
    with the Python stub, the stub's side environment), made in the session cache and linked here,
    so that a server started on it does not copy backends or pip-install again."""
    from ascl.serving.online.server import prepared_backends, prepared_stub_env

    path.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASCL_CACHE", str(session_folder("ASCL_CACHE")))
        prepared = [prepared_backends(), prepared_stub_env()]  # the stub env is None when NumPy < 2
    for folder in prepared:
        if folder is not None and not (path / folder.name).exists():
            (path / folder.name).symlink_to(folder)
    return path


# ---------------------------------------------------------------------------- markers

# Program -> the marker a test needs to start it (matched against /proc/PID/comm).
WATCHED = {"tritonserver": "triton", "chromium": "browser", "chrome": "browser"}
# Session fixtures that start a server: every test that uses one is marked with it.
SERVER_FIXTURES = {"digits_service": "triton"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in SERVER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _stat(pid: str) -> tuple[str, str] | None:
    """(command name, parent pid) of a live process, from /proc; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, _, rest = text.partition(" (")[2].rpartition(") ")
    return name, rest.split()[1]


class ProcessWatch:
    """Notes every new process below this one whose name is in ``names`` (polled from /proc)."""

    def __init__(self, names: set[str], every_s: float = 0.2) -> None:
        self.names, self.every_s = names, every_s
        self.me = str(os.getpid())
        self.known = set(self._pids())
        self.parents: dict[str, str] = {}
        self.found: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="process-watch")
        self._thread.start()

    @staticmethod
    def _pids() -> list[str]:
        return [p for p in os.listdir("/proc") if p.isdigit()]

    def _run(self) -> None:
        while True:
            self.scan()
            if self._stop.wait(self.every_s):
                return

    def scan(self) -> None:
        for pid in self._pids():
            if pid in self.known:
                continue
            self.known.add(pid)
            info = _stat(pid)
            if info is None:
                continue
            name, self.parents[pid] = info
            if any(name.startswith(n) for n in self.names) and self._mine(pid):
                self.found.add(name)

    def _mine(self, pid: str) -> bool:
        for _ in range(32):
            pid = self.parents.get(pid) or (_stat(pid) or ("", "0"))[1]
            if pid == self.me:
                return True
            if pid in ("0", "1"):
                return False
        return False

    def stop(self) -> set[str]:
        self._stop.set()
        self._thread.join()
        self.scan()
        return self.found


_WATCH = pytest.StashKey[ProcessWatch]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    allowed = {marker for marker in set(WATCHED.values()) if item.get_closest_marker(marker)}
    names = {name for name, marker in WATCHED.items() if marker not in allowed}
    if names:
        item.stash[_WATCH] = ProcessWatch(names)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    result = yield
    watch = item.stash.get(_WATCH, None)
    if watch is not None:
        started = watch.stop()
        if started:
            needed = sorted({marker for name in started for prefix, marker in WATCHED.items() if name.startswith(prefix)})
            pytest.fail(f"{item.nodeid} started {', '.join(sorted(started))} but is not marked "
                        f"{' / '.join(needed)}: add @pytest.mark.{needed[0]} (or use a fixture that marks it), "
                        "so that the quick loop (-m 'not triton and not browser') leaves it out", pytrace=False)
    return result


# ---------------------------------------------------------------------------- shared helpers and data


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def cifar_tar() -> Path:
    """The offline CIFAR-10 copy (``$ASCL_CIFAR10_TAR``, else ``../shared/data/cifar10/train.tar.gz``).

    A missing copy fails the tests that need it, saying where it was looked for: it is test
    data a CPU machine can have, not something to skip silently."""
    from ascl.image_sources import ImageSourceNotFound, require_cifar_tar

    try:
        return require_cifar_tar()
    except ImageSourceNotFound as exc:
        pytest.fail(f"these tests need the offline CIFAR-10 copy: {exc}", pytrace=False)


def write_digits_folder(root: Path, per_class: int = 12, size: int = 32, classes: int = 10) -> Path:
    """scikit-learn's digits as RGB PNGs in ImageFolder layout: root/<digit>/<i>.png."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[int, int] = {}
    for img, label in zip(digits.images, digits.target, strict=True):
        label = int(label)
        if label >= classes or counts.get(label, 0) >= per_class:
            continue
        arr = (img / 16.0 * 255).astype(np.uint8)
        pil = Image.fromarray(arr, mode="L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pil.save(folder / f"{counts.get(label, 0):04d}.png")
        counts[label] = counts.get(label, 0) + 1
    return root


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled ImageFolder (10 classes x 12 images, 32x32 RGB) made from real digits."""
    return write_digits_folder(tmp_path_factory.mktemp("digits"))


# ---------------------------------------------------------------------------- the digits gallery, served


@pytest.fixture(scope="session")
def random_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded (0), randomly initialised ResNet-18 at 32 px exported to ONNX: the digits gallery's model."""
    from serving_helpers import export_random_encoder

    return export_random_encoder(tmp_path_factory.mktemp("random-onnx") / "encoder.onnx")


@pytest.fixture(scope="session")
def digits_index(random_onnx: Path, digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The 120 digits indexed with ``random_onnx``, built once. Tests only read it (copy it to change
    it); the session fails at the end if one wrote to it."""
    from ascl.serving.collections.build import build_index
    from ascl.serving.collections.faiss_index import manifest_version

    folder = tmp_path_factory.mktemp("digits-index") / "idx"
    build_index(random_onnx, str(digits_folder), folder, progress=False)
    version = manifest_version(folder)
    yield folder
    assert manifest_version(folder) == version, f"a test wrote to the shared index {folder}; copy it first"


@dataclass
class DigitsService:
    """``digits_service``: the service, its model, index and gallery."""

    service: SearchService
    onnx: Path
    index: Path
    gallery: Path

    @property
    def triton_grpc_url(self) -> str:
        """Triton itself, behind the front door: what the Python models answer without the door's checks."""
        assert self.service.triton is not None
        return self.service.triton.grpc_url


@pytest.fixture(scope="session")
def digits_service(random_onnx: Path, digits_index: Path, digits_folder: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[DigitsService]:
    """One ``ascl serve`` service (front door, the real tritonserver, supervisor) over ``digits_index``
    for the whole session, stopped at its end. Tests only read through it: a test that changes a
    served index starts its own server. Using it marks a test ``triton``."""
    from serving_helpers import processes_mentioning

    from ascl.serving.online.repository import write_repository
    from ascl.serving.online.service import SearchService

    repo = write_repository(tmp_path_factory.mktemp("digits-served") / "models", random_onnx, digits_index)
    service = SearchService(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                            log=lambda text: None)
    try:
        service.start()
        yield DigitsService(service, random_onnx, digits_index, digits_folder)
    finally:
        service.stop()
    assert processes_mentioning(str(repo)) == []


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    """Every test starts with one torch thread: tests share 2 cores with the servers they start,
    and on this machine a training step ran several times faster with 1 thread than with 2 under
    load. Per test, so a test that changes the count cannot leak it into the next."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Milvus standalone server (PyPI ``milvus``) on free ports, data under tmp, stopped after the
    session (``tests/milvus_helpers.py``); a skip with the reason where it cannot start here."""
    from milvus_helpers import MilvusProcess

    try:
        import milvus  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the Milvus server or client is not installed ({exc}): pip install 'ascl-hub[dev]'")
    server = MilvusProcess(tmp_path_factory.mktemp("milvus"))
    try:
        server.start()
    except Exception as exc:
        server.close()
        pytest.skip(f"the real Milvus server (PyPI milvus) could not start here ({str(exc)[:300]}); the index "
                    "contract still runs on Milvus Lite")
    yield server
    server.close()
