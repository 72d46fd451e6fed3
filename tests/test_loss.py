"""ASCL loss against an independent reference written from the paper's formula (numpy loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ascl.training.loss import ASCLLoss, BYOLRegressionLoss, InBatchASCLLoss, confidence, soft_targets

MODES = ("ascl", "ahcl", "hard", "none")


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_loss(q: np.ndarray, k: np.ndarray, queue: np.ndarray, t1: float, t2: float, n_nb: int, mode: str) -> float:
    """Straight from the formula, one row at a time, in float64."""
    total = 0.0
    num = queue.shape[0]
    for i in range(q.shape[0]):
        sims = np.array([k[i] @ queue[j] for j in range(num)]) / t2
        p = np.exp(sims - sims.max())
        p /= p.sum()
        entropy = -sum(pj * math.log(pj) for pj in p if pj > 0)
        c = 1.0 - entropy / math.log(num) if num > 1 else 1.0
        top = set(np.argsort(-p, kind="stable")[:n_nb].tolist())
        target = [1.0]
        for j in range(num):
            if mode == "ascl":
                target.append(min(n_nb * c * p[j], 1.0))
            elif mode == "ahcl":
                target.append(c if j in top else 0.0)
            elif mode == "hard":
                target.append(1.0 if j in top else 0.0)
            else:
                target.append(0.0)
        target_arr = np.array(target) / sum(target)
        logits = np.array([q[i] @ k[i]] + [q[i] @ queue[j] for j in range(num)]) / t1
        log_soft = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
        total += -(target_arr * log_soft).sum()
    return total / q.shape[0]


def as_t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).double()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("n", "num", "t1", "t2", "n_nb"),
    [(4, 16, 0.1, 0.05, 1), (7, 33, 0.2, 0.1, 3), (1, 2, 0.07, 0.5, 1), (5, 64, 0.5, 0.02, 5)],
)
def test_matches_reference(mode: str, n: int, num: int, t1: float, t2: float, n_nb: int) -> None:
    rng = np.random.default_rng(n * 100 + num)
    q, k, queue = unit(rng, n, 8), unit(rng, n, 8), unit(rng, num, 8)
    # make some queue entries near-duplicates of keys so neighbours matter
    queue[: min(n, num)] = unit(rng, 1, 8) * 0.05 + k[: min(n, num)]
    queue /= np.linalg.norm(queue, axis=1, keepdims=True)
    got = ASCLLoss(t1, t2, n_nb, mode)(as_t(q), as_t(k), as_t(queue)).item()
    assert got == pytest.approx(reference_loss(q, k, queue, t1, t2, n_nb, mode), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_targets_rows_sum_to_one(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    k = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    queue = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    t = soft_targets(k, queue, 0.05, 3, mode)
    assert t.shape == (6, 51)
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    assert (t >= 0).all() and (t[:, 0] > 0).all()


def test_confidence_in_unit_interval() -> None:
    uniform = torch.full((1, 10), 0.1)
    one_hot = torch.zeros(1, 10)
    one_hot[0, 3] = 1.0
    rand = torch.softmax(torch.randn(20, 10) * 5, dim=1)
    c = confidence(torch.cat([uniform, one_hot, rand]))
    assert c[0].item() == pytest.approx(0.0, abs=1e-6)
    assert c[1].item() == pytest.approx(1.0, abs=1e-6)
    assert ((c >= 0) & (c <= 1)).all()


def test_mode_none_is_infonce_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(8, 32, generator=g), dim=1)
    k = F.normalize(torch.randn(8, 32, generator=g), dim=1)
    queue = F.normalize(torch.randn(100, 32, generator=g), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(ASCLLoss(t1=0.2, mode="none")(q, k, queue), expected)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_only_through_q(mode: str) -> None:
    g = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(5, 16, generator=g), dim=1).requires_grad_()
    k = F.normalize(torch.randn(5, 16, generator=g), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(40, 16, generator=g), dim=1).requires_grad_()
    ASCLLoss(mode=mode)(q, k, queue).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_ascl_differs_from_infonce_when_neighbours_exist() -> None:
    g = torch.Generator().manual_seed(3)
    k = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    queue = torch.cat([k, F.normalize(torch.randn(20, 16, generator=g), dim=1)])  # keys sit in the queue
    t = soft_targets(k, queue, 0.05, 1, "ascl")
    assert (t[:, 1:5].diagonal() > 0.3).all()  # the key's own copy in the queue gets a large soft label


def reference_byol_ascl(h: np.ndarray, z: np.ndarray, offset: int, t2: float, n_nb: int, mode: str) -> float:
    """BYOL + ASCL as the authors released it, one row at a time in float64: targets
    w_ij (own 1; others min(n c p_ij, 1) from softmax(z_i.z_j / t2) over the other rows,
    c = 1 - H / log(M - 1)), rows normalised; loss = mean_i (2 - 2 sum_j w_ij h_i.z_j)."""
    total = 0.0
    m = z.shape[0]
    for i in range(h.shape[0]):
        own = offset + i
        others = [j for j in range(m) if j != own]
        sims = np.array([z[own] @ z[j] for j in others]) / t2
        p = np.exp(sims - sims.max())
        p /= p.sum()
        entropy = -sum(pj * math.log(pj) for pj in p if pj > 0)
        c = 1.0 - entropy / math.log(len(others)) if len(others) > 1 else 1.0
        top = set(np.argsort(-p, kind="stable")[:n_nb].tolist())
        weights = {own: 1.0}
        for idx, j in enumerate(others):
            if mode == "ascl":
                weights[j] = min(n_nb * c * p[idx], 1.0)
            elif mode == "ahcl":
                weights[j] = c if idx in top else 0.0
            elif mode == "hard":
                weights[j] = 1.0 if idx in top else 0.0
            else:
                weights[j] = 0.0
        norm = sum(weights.values())
        total += 2.0 - 2.0 * sum(w / norm * float(h[i] @ z[j]) for j, w in weights.items())
    return total / h.shape[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("offset", "n_nb", "t2"), [(0, 1, 0.05), (3, 2, 0.1), (5, 4, 0.5)])
def test_byol_ascl_matches_the_released_formulation(mode: str, offset: int, n_nb: int, t2: float) -> None:
    rng = np.random.default_rng(offset + 10 * n_nb)
    z = unit(rng, 9, 8)
    z[1] = z[0] + 0.05 * unit(rng, 1, 8)[0]  # a near-duplicate pair, so neighbours matter
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    h = unit(rng, 4, 8)
    got = InBatchASCLLoss(t1=0.7, t2=t2, n_neighbors=n_nb, mode=mode)(as_t(h), as_t(z), offset)
    assert got.dtype == torch.float64  # no rounding to float32 on the way
    assert got.item() == pytest.approx(reference_byol_ascl(h, z, offset, t2, n_nb, mode), rel=1e-9, abs=1e-12)
    t1_changed = InBatchASCLLoss(t1=0.05, t2=t2, n_neighbors=n_nb, mode=mode)(as_t(h), as_t(z), offset)
    assert t1_changed.item() == got.item()  # t1 is unused by the regression


def test_byol_ascl_mode_none_is_byol_regression_and_grads_reach_only_h() -> None:
    g = torch.Generator().manual_seed(4)
    h = F.normalize(torch.randn(5, 16, generator=g), dim=1).requires_grad_()
    z = F.normalize(torch.randn(7, 16, generator=g), dim=1).requires_grad_()
    torch.testing.assert_close(InBatchASCLLoss(mode="none")(h, z, 2), BYOLRegressionLoss()(h, z, 2))
    InBatchASCLLoss()(h, z, 2).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0 and z.grad is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_losses_compute_in_at_least_float32_and_never_lower_than_the_input(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    q, k = (F.normalize(torch.randn(4, 8, generator=g), dim=1).to(dtype) for _ in range(2))
    queue = F.normalize(torch.randn(16, 8, generator=g), dim=1)  # float32 queue beside any input
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert ASCLLoss()(q, k, queue).dtype == want
    assert InBatchASCLLoss()(q, torch.cat([k, queue]).to(dtype), 0).dtype == want
    assert BYOLRegressionLoss()(q, k, 0).dtype == want
    exact = ASCLLoss()(q.double(), k.double(), queue.double())
    if dtype == torch.float64:
        assert ASCLLoss()(q, k, queue).item() == exact.item()  # the float64 result, bit for bit


@pytest.mark.parametrize(("kwargs", "match"), [({"t1": 0}, "temperatures"), ({"n_neighbors": 0}, "n_neighbors"),
                                               ({"mode": "soft"}, "unknown mode")])
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ASCLLoss(**kwargs)  # type: ignore[arg-type]
