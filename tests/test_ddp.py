"""DDP with 2 gloo processes on CPU equals one process with the combined batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from ddp_helpers import ddp_worker, one_step

pytestmark = pytest.mark.slow  # two processes of torch, one gloo step


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return torch.load(Path(out) / "ddp.pt", weights_only=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_ddp_matches_single_process(ddp_results: dict[str, dict], framework: str) -> None:
    single = one_step(framework, rank=0, world=1)  # conftest: one torch thread, as in the workers
    ddp = ddp_results[framework]
    torch.testing.assert_close(ddp["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    assert ddp["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 10
    for name, grad in single["grads"].items():
        atol = max(1e-6, 1e-4 * float(grad.abs().max()))
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=atol, msg=f"gradient of {name} differs")
    torch.testing.assert_close(ddp["queue"], single["queue"])  # keys of both ranks entered the queue in order
