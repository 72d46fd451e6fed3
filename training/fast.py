"""The fast training step: bf16 autocast, channels_last, ``torch.compile``, fused SGD, no host sync.

Same semantics as ``ascl.training.step.make_reference_step``: one call is forward (the
framework does its momentum and queue updates inside, under no_grad), backward and one
optimizer step, and returns the loss. What changes is only how the GPU is driven:

- bf16 autocast (``amp="bf16"``): the convs and matmuls run on tensor cores; no loss scaling
  (bf16 has fp32's range), so no ``GradScaler`` and none of its host syncs.
- channels_last: the model's 4-D weights and the views are NHWC, the layout cuDNN's fastest
  convs and BatchNorm kernels want. ``SplitBatchNorm`` (MoCo's shuffle-BN on one process)
  computes its statistics from a ``[groups, n/groups, C, H, W]`` view of the batch, which
  exists for any memory format, so it never copies to NCHW and back.
- ``torch.compile`` of the networks (``compile_trunks``), whose backward AOTAutograd compiles
  too; the framework's own glue (shuffle, momentum update, loss, queue) stays eager. Mode
  ``default``: no CUDA graphs and no autotuning. At batch 512-1024 a ResNet-18 step is 10-25 ms
  of GPU work behind a few hundred kernel launches the CPU issues far ahead of the GPU (no
  sync), so CUDA graphs ("reduce-overhead") would only cut CPU time that is already hidden,
  while copying every batch into static buffers and re-recording around the per-step RNG
  (batch shuffle) and the in-place queue and momentum-encoder writes. "max-autotune" spends
  minutes benchmarking kernels, a poor trade inside a 10-minute run. Both remain selectable
  (``compile_mode``) for small batches, where launch overhead does dominate.
- the loss itself stays fp32 under autocast (``Float32Loss``): its logits are divided by
  temperatures of 0.1 and 0.05, where bf16's 3 significant digits would show.
- a fused SGD (``make_fast_optimizer``) updates all parameters in a few kernels.
- the loss comes back as a detached device tensor: the caller decides when to sync
  (e.g. every ``log_every`` steps), never the step itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

AMPS = ("bf16", "off", "auto")
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Float32Loss(nn.Module):
    """Runs a stateless loss with autocast off, its floating-point tensors in float32 or wider.

    Other arguments (BYOL's integer ``offset``, integer tensors) pass through unchanged.

    Under bf16 autocast the ASCL logits ``q.k / t1`` and ``k.queue / t2`` would be bf16
    matmuls (about 3 significant digits, then divided by 0.1 and 0.05); the loss is a
    [N, K] product, a small share of the step, so it stays in fp32 like the reference.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> torch.Tensor:
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        with torch.autocast(device, enabled=False):
            return self.inner(*(_at_least_float32(a) for a in args))  # type: ignore[no-any-return]


def _at_least_float32(value: Any) -> Any:
    """A floating-point tensor below float32 -> float32; anything else unchanged."""
    if torch.is_tensor(value) and value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
        return value.float()
    return value


def use_float32_loss(framework: nn.Module) -> bool:
    """Wrap ``framework.loss`` in ``Float32Loss`` when it is a stateless module (state dict unchanged)."""
    inner = getattr(framework, "module", framework)  # DistributedDataParallel holds the framework as .module
    loss = getattr(inner, "loss", None)
    if not isinstance(loss, nn.Module) or isinstance(loss, Float32Loss) or loss.state_dict():
        return False
    inner.loss = Float32Loss(loss)
    return True


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``bf16`` -> torch.bfloat16; ``off`` -> None; ``auto`` -> bf16 on a CUDA GPU that has it and on
    a CPU with native bf16 dot products (AVX512-BF16 / AMX), else None.

    On such a CPU a 128-px ResNet-18 step ran 1.7x faster under bf16 with the same kNN per
    epoch (``benchmarks/results/photo_recipe_trials.json``); on an AVX2 CPU bf16 is emulated
    and made the step 7x slower (``benchmarks/train_throughput.py --device cpu`` measures
    both), so there ``auto`` leaves it off.
    """
    if amp not in AMPS:
        raise ValueError(f"amp must be one of {AMPS} for the fast step (fp16 would need loss scaling), got {amp!r}")
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        from ascl.machine import cpu_has_native_bf16

        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    return torch.bfloat16 if amp == "bf16" else None


def match_state_layout_(optimizer: torch.optim.Optimizer) -> int:
    """Give each per-parameter state tensor (momentum buffer) its parameter's memory layout.

    The fused SGD kernel walks parameter, gradient and buffer as flat memory, so a
    contiguous buffer beside a channels_last weight (a checkpoint from the reference path, or
    weights converted after the optimizer had state) would be updated silently wrong.
    Returns how many tensors were re-laid out.
    """
    changed = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    changed += 1
    return changed


class FastSGD(torch.optim.SGD):
    """SGD whose loaded state always matches its parameters' layout (safe for ``fused=True``)."""

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override,type-arg]
        super().load_state_dict(state_dict)
        match_state_layout_(self)


def make_fast_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """SGD with the fused multi-tensor kernel where the device supports it (CUDA, CPU);
    frozen parameters (momentum twins) are left out."""
    params = [p for p in params if p.requires_grad]
    devices = {p.device.type for p in params}
    fused = devices <= {"cuda", "cpu"} and len(devices) == 1
    return FastSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def compile_trunks(framework: nn.Module, *, mode: str = "default", backend: str = "inductor") -> list[tuple[nn.Module, Any]]:
    """``torch.compile`` the networks inside a framework, not the framework's forward.

    Each direct child with parameters is compiled (its ``backbone`` when it has one, since the
    frameworks call ``encoder.forward_features``); momentum update, batch shuffle, loss and
    queue stay eager. Compiling the whole MoCo forward, with its in-place writes to the queue
    and the momentum encoder, gave wrong gradients under Inductor here (CPU, torch 2.14:
    equal loss, gradients off by up to 100%; ``aot_eager`` exact). Compiled networks with
    plain BatchNorm match eager (2e-5); with split BN, Inductor's CPU code still differs (up
    to 10% relative, ``aot_eager`` exact), so GPU runs check compiled against eager gradients
    first (``tests/test_fast_path.py -m gpu``, run by ``benchmarks/device_gpu.sh``). The
    compiled forward runs only in training mode, so evaluation (kNN, eval mode, odd batch
    sizes) never triggers recompiles. State-dict keys are unchanged. Returns (module, eager
    forward) pairs for ``uncompile_trunks``.
    """
    undo: list[tuple[nn.Module, Any]] = []
    for child in framework.children():
        target = getattr(child, "backbone", child)
        if not isinstance(target, nn.Module) or not any(True for _ in target.parameters()):
            continue
        eager = target.forward
        compiled = torch.compile(eager, mode=mode, backend=backend, dynamic=False)

        def forward(*args: Any, _m: nn.Module = target, _c: Any = compiled, _e: Any = eager, **kwargs: Any) -> Any:
            return _c(*args, **kwargs) if _m.training else _e(*args, **kwargs)

        target.forward = forward  # type: ignore[method-assign]
        undo.append((target, eager))
    return undo


def uncompile_trunks(undo: list[tuple[nn.Module, Any]]) -> None:
    """Put back the eager forwards that ``compile_trunks`` replaced."""
    for module, _ in undo:
        if "forward" in module.__dict__:
            del module.__dict__["forward"]


def make_fast_step(
    framework: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    amp: str,
    compile: bool,
    compile_mode: str = "default",
    backend: str = "inductor",
    channels_last: bool = True,
) -> Step:
    """A training step ``step(x_q, x_k) -> loss`` (detached, on the device; never ``.item()``).

    Prepares ``framework`` in place: channels_last weights (when ``channels_last``), an fp32 loss under autocast (``Float32Loss``), and with
    ``compile`` its networks compiled (``compile_trunks``: ``compile_mode``, ``backend``); on
    CUDA it turns on ``cudnn.benchmark`` (process-wide; the step's shapes never change). If
    compiling fails, the step says so on stderr and runs eagerly from then on
    (``step.compiled`` tells which). Views should be channels_last too.
    """
    device = _device_of(framework)
    dtype = resolve_amp(amp, device)
    if dtype is not None:
        use_float32_loss(framework)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): pick the fastest conv kernels once
    if channels_last:
        framework.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        match_state_layout_(optimizer)  # state made before the conversion keeps the old layout
    inner = getattr(framework, "module", framework)  # DistributedDataParallel holds the framework as .module
    undo = compile_trunks(inner, mode=compile_mode, backend=backend) if compile else []

    def forward(x_q: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return framework(x_q, x_k)  # type: ignore[no-any-return]

    def train_step(x_q: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = forward(x_q, x_k)
            loss.backward()
        except Exception as exc:  # a compiler failure must not lose the run: fall back to eager
            if not undo:
                raise
            print(f"torch.compile failed ({type(exc).__name__}: {exc}); continuing eagerly", file=sys.stderr)
            uncompile_trunks(undo)
            undo.clear()
            train_step.compiled = False  # type: ignore[attr-defined]
            optimizer.zero_grad(set_to_none=True)
            loss = forward(x_q, x_k)
            loss.backward()
        optimizer.step()
        return loss.detach()

    train_step.compiled = bool(undo)  # type: ignore[attr-defined]
    return train_step
