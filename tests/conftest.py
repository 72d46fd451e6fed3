"""Shared test fixtures: free ports, small real image sets, GPU skipping."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TAR = ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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


@pytest.fixture(scope="session")
def cifar_tar() -> Path:
    """The offline CIFAR-10 copy beside the checkout (present in CI)."""
    if not CIFAR_TAR.exists():
        pytest.skip(f"offline CIFAR-10 copy not found at {CIFAR_TAR}")
    return CIFAR_TAR


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
