"""The fast path on CPU: loader contract and determinism, split BN without layout copies, and a
fast step that trains exactly like the reference step (amp off, compile off)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ascl.encoder import Encoder
from ascl.machine import cpu_has_native_bf16
from ascl.training.augment import AugmentConfig
from ascl.training.byol import BYOL
from ascl.training.fast import (
    Float32Loss,
    make_fast_optimizer,
    make_fast_step,
    resolve_amp,
    use_float32_loss,
)
from ascl.training.gpu_data import GpuTwoViewLoader
from ascl.training.loss import ASCLLoss, BYOLRegressionLoss, InBatchASCLLoss
from ascl.training.moco import MoCo
from ascl.training.modules import SplitBatchNorm
from ascl.training.step import make_reference_step

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def images(n: int = 40, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def loader(seed: int = 0, **kw: object) -> GpuTwoViewLoader:
    return GpuTwoViewLoader(images(), 8, 8, MEAN, STD, AugmentConfig(), seed=seed, **kw)  # type: ignore[arg-type]


def tiny_moco(dtype: torch.dtype = torch.float32) -> MoCo:
    torch.manual_seed(0)
    fw = MoCo(Encoder(image_size=8), ASCLLoss(0.1, 0.05, 1, "ascl"), head_hidden=16, head_dim=8,
              queue_size=12, momentum=0.99, bn_splits=2)
    return fw.to(dtype).train()


def test_loader_shapes_format_and_range() -> None:
    dl = loader()
    assert len(dl) == 5
    batches = list(dl)
    assert len(batches) == 5
    for x_q, x_k in batches:
        for x in (x_q, x_k):
            assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32
            assert x.is_contiguous(memory_format=torch.channels_last)
            lo = min((0 - m) / s for m, s in zip(MEAN, STD, strict=True))
            hi = max((1 - m) / s for m, s in zip(MEAN, STD, strict=True))
            assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5
    x_q, _ = next(iter(loader(channels_last=False)))
    assert x_q.is_contiguous()
    assert len(GpuTwoViewLoader(images(), 16, 8, MEAN, STD, None, seed=0, drop_last=False)) == 3


def test_loader_is_deterministic_per_seed_and_epoch() -> None:
    a, b = loader(seed=1), loader(seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    for (qa, ka), (qb, kb) in zip(a, b, strict=True):
        assert torch.equal(qa, qb) and torch.equal(ka, kb)
    a.set_epoch(3)
    first = next(iter(a))
    a.set_epoch(4)
    assert not torch.equal(next(iter(a))[0], first[0])
    c = loader(seed=2)
    c.set_epoch(3)
    assert not torch.equal(next(iter(c))[0], first[0])
    # resuming mid-epoch yields exactly the remaining batches
    a.set_epoch(3)
    full = list(a)
    a.set_epoch(3, start_batch=2)
    rest = list(a)
    assert len(rest) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(rest, full[2:], strict=True))
    # without set_epoch every pass is a new epoch
    d = loader(seed=1)
    assert not torch.equal(next(iter(d))[0], next(iter(d))[0])


def test_loader_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        GpuTwoViewLoader(images().float(), 8, 8, MEAN, STD, None, seed=0)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        GpuTwoViewLoader(images(4), 8, 8, MEAN, STD, None, seed=0)


def _per_group_batch_norm(bn: SplitBatchNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: plain training-mode F.batch_norm on each group of n/g contiguous samples, each
    with its own copy of the running stats, then the groups' running stats averaged."""
    g = bn.num_splits
    outs, means, vars_ = [], [], []
    for chunk in x.chunk(g):
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        outs.append(F.batch_norm(chunk, rm, rv, bn.weight, bn.bias, True, bn.momentum, bn.eps))
        means.append(rm)
        vars_.append(rv)
    return torch.cat(outs), torch.stack(means).mean(0), torch.stack(vars_).mean(0)


@pytest.mark.parametrize("shape", [(12, 6, 5, 5), (12, 6)])
def test_split_bn_equals_per_group_batch_norm_in_any_layout(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    bn = SplitBatchNorm(6, 3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    x = torch.randn(*shape) * 3 + 1
    x_ref = x.clone().requires_grad_()
    ref_bn = copy.deepcopy(bn)
    y_ref, mean_ref, var_ref = _per_group_batch_norm(ref_bn, x_ref)
    x_cl = x.clone().contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.clone()
    x_cl.requires_grad_()
    y = bn(x_cl)
    if x.dim() == 4:  # no copy to NCHW and back: the output keeps the input's layout
        assert y.is_contiguous(memory_format=torch.channels_last)
    w = torch.randn_like(y_ref)
    (y_ref * w).sum().backward()
    (y * w).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_cl.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(bn.running_mean, mean_ref)
    torch.testing.assert_close(bn.running_var, var_ref)
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    torch.testing.assert_close(bn(x_cl), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                       False, 0.0, bn.eps))


def _batch(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=g, dtype=dtype), torch.randn(4, 3, 8, 8, generator=g, dtype=dtype)


def test_fast_step_trains_exactly_like_the_reference_step() -> None:
    """float64 removes rounding (channels_last convs sum in another order): any difference
    left would be a semantic one: the loss, then weights, momentum encoder, queue and BN stats."""
    ref_fw = tiny_moco(torch.float64)
    fast_fw = copy.deepcopy(ref_fw)
    ref_opt = torch.optim.SGD([p for p in ref_fw.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4)
    fast_opt = make_fast_optimizer(fast_fw.parameters(), 0.1, 0.9, 5e-4)
    ref_step = make_reference_step(ref_fw, ref_opt)
    fast_step = make_fast_step(fast_fw, fast_opt, amp="off", compile=False)
    x_q, x_k = _batch(torch.float64, 0)
    torch.manual_seed(100)  # the batch shuffle draws from the global RNG
    loss_ref = ref_step(x_q, x_k)
    torch.manual_seed(100)
    loss_fast = fast_step(x_q.contiguous(memory_format=torch.channels_last), x_k.contiguous(memory_format=torch.channels_last))
    assert not loss_fast.requires_grad
    torch.testing.assert_close(loss_fast, loss_ref, atol=1e-10, rtol=1e-10)
    assert int(fast_fw.queue.ptr) == int(ref_fw.queue.ptr) == 4
    ref_state, fast_state = ref_fw.state_dict(), fast_fw.state_dict()
    assert list(ref_state) == list(fast_state)
    for key, value in ref_state.items():
        assert torch.allclose(fast_state[key], value, atol=1e-7, rtol=1e-7), key


def test_fast_step_first_loss_equals_reference_in_fp32() -> None:
    ref_fw = tiny_moco()
    fast_fw = copy.deepcopy(ref_fw)
    ref_step = make_reference_step(ref_fw, torch.optim.SGD([p for p in ref_fw.parameters() if p.requires_grad], lr=0.1))
    fast_step = make_fast_step(fast_fw, make_fast_optimizer(fast_fw.parameters(), 0.1, 0.0, 0.0), amp="off", compile=False,
                               channels_last=False)
    x_q, x_k = _batch(torch.float32, 7)
    torch.manual_seed(1)
    a = ref_step(x_q, x_k)
    torch.manual_seed(1)
    torch.testing.assert_close(fast_step(x_q, x_k), a, atol=1e-5, rtol=1e-5)


def test_compiled_trunks_train_like_eager() -> None:
    """``compile=True`` compiles the networks in place (state-dict keys unchanged), the step's
    gradients equal the eager step's, and evaluation mode bypasses the compiled forward."""
    eager_fw = tiny_moco()
    compiled_fw = copy.deepcopy(eager_fw)
    keys = list(eager_fw.state_dict())
    eager_step = make_fast_step(eager_fw, torch.optim.SGD([p for p in eager_fw.parameters() if p.requires_grad], lr=0.0),
                                amp="off", compile=False)
    step = make_fast_step(compiled_fw, torch.optim.SGD([p for p in compiled_fw.parameters() if p.requires_grad], lr=0.0),
                          amp="off", compile=True, backend="eager")
    assert step.compiled is True  # type: ignore[attr-defined]
    assert {"forward"} <= set(vars(compiled_fw.encoder.backbone)) and "forward" in vars(compiled_fw.target_head)
    assert list(compiled_fw.state_dict()) == keys
    x_q, x_k = (x.contiguous(memory_format=torch.channels_last) for x in _batch(torch.float32, 3))
    torch.manual_seed(5)
    a = eager_step(x_q, x_k)
    torch.manual_seed(5)
    b = step(x_q, x_k)
    torch.testing.assert_close(b, a)
    for (name, p), q in zip(eager_fw.named_parameters(), compiled_fw.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=name)
    frames = dict(torch._dynamo.utils.counters["frames"])
    compiled_fw.eval()
    with torch.no_grad():
        compiled_fw.encoder(torch.randn(3, 3, 8, 8))  # odd batch, eval mode: eager, nothing compiled
    assert dict(torch._dynamo.utils.counters["frames"]) == frames
    compiled_fw.train()
    with torch.no_grad():
        compiled_fw.encoder(torch.randn(4, 3, 8, 8))  # training mode goes through torch.compile
    assert dict(torch._dynamo.utils.counters["frames"]) != frames


def test_float32_loss_under_autocast() -> None:
    torch.manual_seed(0)
    q, k = nn.functional.normalize(torch.randn(4, 8), dim=1), nn.functional.normalize(torch.randn(4, 8), dim=1)
    queue = nn.functional.normalize(torch.randn(16, 8), dim=1)
    loss = ASCLLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = Float32Loss(loss)(q.bfloat16(), k.bfloat16(), queue)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loss(q.bfloat16().float(), k.bfloat16().float(), queue))
    fw = tiny_moco()
    keys = list(fw.state_dict())
    assert use_float32_loss(fw) and isinstance(fw.loss, Float32Loss)
    assert not use_float32_loss(fw)  # already wrapped
    assert list(fw.state_dict()) == keys


def tiny_framework(name: str, mode: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """MoCo or BYOL at base width 8, 16 px, with ``mode``'s loss (BYOL's plain loss for ``none``)."""
    torch.manual_seed(0)
    if name == "moco":
        fw: nn.Module = MoCo(Encoder(image_size=16, width=8), ASCLLoss(0.1, 0.05, 2, mode), head_hidden=32,
                             head_dim=16, queue_size=48, bn_splits=2)
    else:
        loss = BYOLRegressionLoss() if mode == "none" else InBatchASCLLoss(0.1, 0.05, 2, mode)
        fw = BYOL(Encoder(image_size=16, width=8), loss, head_hidden=32, head_dim=16, pred_hidden=32, bn_splits=2)
    return fw.to(dtype).train()


def _views(dtype: torch.dtype, seed: int, n: int = 16, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of image-like views: 8 samples per BatchNorm group keeps the gradients tame."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
    return base + 0.3 * torch.randn(base.shape, generator=g, dtype=dtype), base.flip(3)


def test_float32_loss_passes_byol_offset_through() -> None:
    g = torch.Generator().manual_seed(0)
    p, z = (nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1) for _ in range(2))
    for inner in (BYOLRegressionLoss(), InBatchASCLLoss()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = Float32Loss(inner)(p.bfloat16(), z.bfloat16(), 0)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, inner(p.bfloat16().float(), z.bfloat16().float(), 0))
    double = Float32Loss(BYOLRegressionLoss())(p.double(), z.double(), 0)
    assert double.dtype == torch.float64  # never below the input's precision


@pytest.mark.parametrize("framework", ["moco", "byol"])
@pytest.mark.parametrize("mode", ["ascl", "ahcl", "hard", "none"])
def test_fast_step_every_framework_and_mode(framework: str, mode: str) -> None:
    """The CPU fast step (channels_last, fused SGD) gives the reference step's loss and update
    on the same batch and seed, for MoCo and BYOL in every loss mode (float64: no rounding
    differences left to hide a semantic one). With bf16 autocast the loss stays float32 (it
    runs outside autocast) within 2% of the fp32 loss, and the bf16 update points where the
    fp32 one does (cosine > 0.7; bf16 rounds every activation and gradient, measured 0.82-0.94)."""
    ref_fw = tiny_framework(framework, mode, torch.float64)
    fast_fw = copy.deepcopy(ref_fw)
    ref_step = make_reference_step(ref_fw, torch.optim.SGD([p for p in ref_fw.parameters() if p.requires_grad], lr=0.1))
    fast_step = make_fast_step(fast_fw, make_fast_optimizer(fast_fw.parameters(), 0.1, 0.0, 0.0), amp="off", compile=False)
    x_q, x_k = _views(torch.float64, 11)
    torch.manual_seed(3)
    ref = ref_step(x_q, x_k)
    torch.manual_seed(3)
    fast = fast_step(x_q.contiguous(memory_format=torch.channels_last), x_k.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
    for key, value in ref_fw.state_dict().items():
        assert torch.allclose(fast_fw.state_dict()[key], value, atol=1e-9, rtol=1e-9), key
    assert fast_fw.encoder.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)

    fp32_fw = tiny_framework(framework, mode)
    start = torch.cat([p.detach().flatten() for p in fp32_fw.encoder.parameters()])
    bf16_fw = copy.deepcopy(fp32_fw)
    bf16_step = make_fast_step(bf16_fw, make_fast_optimizer(bf16_fw.parameters(), 0.1, 0.0, 0.0), amp="bf16",
                               compile=False)
    assert isinstance(bf16_fw.loss, Float32Loss)
    fp32_step = make_fast_step(fp32_fw, make_fast_optimizer(fp32_fw.parameters(), 0.1, 0.0, 0.0), amp="off",
                               compile=False)
    x_q, x_k = (x.float().contiguous(memory_format=torch.channels_last) for x in (x_q, x_k))
    torch.manual_seed(3)
    fp32 = fp32_step(x_q, x_k)
    torch.manual_seed(3)
    bf16 = bf16_step(x_q, x_k)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16)
    assert abs(bf16.item() - fp32.item()) < 0.02 * max(abs(fp32.item()), 0.1), (bf16.item(), fp32.item())
    moves = [torch.cat([p.detach().float().flatten() for p in fw.encoder.parameters()]) - start for fw in (fp32_fw, bf16_fw)]
    cosine = F.cosine_similarity(moves[0], moves[1], dim=0).item()
    assert cosine > 0.7, f"the bf16 step moved the weights elsewhere than the fp32 step (cosine {cosine:.3f})"


def test_fused_optimizer_survives_state_in_another_layout() -> None:
    """A contiguous momentum buffer (reference-path checkpoint) beside a channels_last weight:
    the fused kernel would walk both as flat memory; FastSGD re-lays the state out on load."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last))
    ref_w = nn.Parameter(w.detach().clone().contiguous())
    ours = make_fast_optimizer([w], 0.1, 0.9, 0.0)
    ref = torch.optim.SGD([ref_w], lr=0.1, momentum=0.9)
    for i in range(3):
        g = torch.randn(4, 3, 3, 3)
        w.grad, ref_w.grad = g.contiguous(memory_format=torch.channels_last), g.clone()
        ours.step()
        ref.step()
        if i == 0:  # round trip through a state dict whose buffer is contiguous
            state = ours.state_dict()
            state["state"][0]["momentum_buffer"] = state["state"][0]["momentum_buffer"].contiguous()
            ours.load_state_dict(state)
            assert ours.state[w]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(w.detach(), ref_w.detach())


def test_optimizer_and_amp_switches() -> None:
    fw = tiny_moco()
    opt = make_fast_optimizer(fw.parameters(), 0.1, 0.9, 5e-4)
    assert opt.defaults["fused"] is True
    trainable = {id(p) for p in fw.parameters() if p.requires_grad}
    assert {id(p) for p in opt.param_groups[0]["params"]} == trainable
    assert resolve_amp("off", torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cpu")) == torch.bfloat16
    native = cpu_has_native_bf16()  # auto: bf16 only where the CPU has bf16 dot products
    assert resolve_amp("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    with pytest.raises(ValueError, match="fp16"):
        resolve_amp("fp16", torch.device("cpu"))


@pytest.mark.gpu
def test_no_host_sync_in_gpu_loader_and_fast_step() -> None:
    """On a GPU: iterating the loader and running the fast step never waits for the device."""
    import warnings

    dev = torch.device("cuda")
    fw = tiny_moco().to(dev)
    step = make_fast_step(fw, make_fast_optimizer(fw.parameters(), 0.1, 0.9, 5e-4), amp="bf16", compile=False)
    dl = GpuTwoViewLoader(images().to(dev), 8, 8, MEAN, STD, AugmentConfig(), seed=0)
    it = iter(dl)
    step(*next(it))  # warm-up: cuDNN and lazy CUDA initialisation may sync once
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            losses = [step(x_q, x_k) for x_q, x_k in it]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert not syncs, syncs[:5]
    assert torch.isfinite(torch.stack(losses)).all()


@pytest.mark.gpu
def test_compiled_trunks_match_eager_gradients_on_gpu() -> None:
    """On a GPU, fp32: Inductor-compiled networks give the eager step's gradients (the device
    script turns compilation off for its runs when this fails)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    eager_fw = MoCo(Encoder(image_size=32), ASCLLoss(), queue_size=256, bn_splits=8).to(dev).train()
    compiled_fw = copy.deepcopy(eager_fw)
    grads = []
    for fw, comp in ((eager_fw, False), (compiled_fw, True)):
        step = make_fast_step(fw, torch.optim.SGD([p for p in fw.parameters() if p.requires_grad], lr=0.0),
                              amp="off", compile=comp)
        g = torch.Generator(device=dev).manual_seed(1)
        x_q = torch.randn(64, 3, 32, 32, generator=g, device=dev).contiguous(memory_format=torch.channels_last)
        x_k = torch.randn(64, 3, 32, 32, generator=g, device=dev).contiguous(memory_format=torch.channels_last)
        torch.manual_seed(2)
        step(x_q, x_k)
        assert step.compiled is comp  # type: ignore[attr-defined]
        grads.append({n: p.grad.detach().clone() for n, p in fw.named_parameters() if p.grad is not None})
    worst = max(((grads[1][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in grads[0].items())
    assert worst < 1e-2, f"compiled gradients differ from eager by up to {worst:.3g} (relative)"
