"""Which encoder a benchmark runs: any model spec, or the seeded random ResNet-18 it is compared with."""

from __future__ import annotations

from typing import Any

RANDOM_W64 = "random-resnet18-w64"  # seeded random init, width 64: what `ascl up` served before a model shipped


def load_benchmark_encoder(spec: str) -> Any:
    """An Encoder in eval mode: ``spec`` through ``ascl.hub.load_encoder``, or ``random-resnet18-w64``."""
    if spec == RANDOM_W64:
        from ascl.export.golden import init_encoder

        return init_encoder(0, {"arch": "resnet18", "stem": "cifar", "image_size": 32})
    from ascl.hub import load_encoder

    return load_encoder(spec).eval()
