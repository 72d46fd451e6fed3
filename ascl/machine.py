"""What hardware a run or benchmark used, for run records, benchmark JSON and model cards."""

from __future__ import annotations

import os
import platform
from typing import Any


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: Any) -> str:
    """A torch device in words: the GPU's name, or the CPU model with its core count."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return str(torch.cuda.get_device_name(device))
    return f"CPU: {cpu_name()} ({os.cpu_count()} cores)"


# Vector-instruction flags that decide CPU inference speed: AVX2/FMA for fp32, and for int8 the
# dot-product extensions (VNNI, AMX), without which int8 convolutions run at only about twice
# the fp32 rate.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 dot products in hardware


def cpu_simd_flags() -> list[str]:
    """Which of ``SIMD_FLAGS`` this CPU reports in /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [f for f in SIMD_FLAGS if f in present]
    except OSError:
        pass
    return []


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX), where bf16
    autocast makes a training step faster instead of slower."""
    return any(flag in NATIVE_BF16_FLAGS for flag in cpu_simd_flags())
