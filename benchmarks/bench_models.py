"""Which encoder a benchmark runs: any model spec, or the seeded random ResNet-18 it is compared with."""

from __future__ import annotations

from typing import Any

RANDOM_W64 = "random-resnet18-w64"  # seeded random init, width 64: what `ascl up` served before a model shipped
RANDOM_TWIN = "random-twin"  # seeded random init of the compared model's own architecture, width, stem and size


def load_benchmark_encoder(spec: str, twin_of: Any = None) -> Any:
    """An Encoder in eval mode: ``spec`` through ``ascl.hub.load_encoder``, ``random-resnet18-w64``, or
    ``random-twin`` (the architecture of the encoder ``twin_of`` at a seeded random initialisation)."""
    from ascl.export.golden import init_encoder

    if spec == RANDOM_W64:
        return init_encoder(0, {"arch": "resnet18", "stem": "cifar", "image_size": 32})
    if spec == RANDOM_TWIN:
        if twin_of is None:
            raise ValueError(f"{RANDOM_TWIN} needs the encoder it is a twin of")
        config = twin_of.config()
        return init_encoder(0, {k: config[k] for k in ("arch", "stem", "image_size", "width", "mean", "std")})
    from ascl.hub import load_encoder

    return load_encoder(spec).eval()
