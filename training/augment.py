"""The two views of ASCL/MoCo-v2: a strong view for the query, a weak view for the key.

Every distribution parameter lives in ``AugmentConfig`` so that the reference PIL pipeline
here and the GPU pipeline (``ascl.training.gpu_data``) sample the same distributions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

VIEWS = ("strong", "weak")


@dataclass
class AugmentConfig:
    """Augmentation distributions (MoCo-v2 / the ASCL paper's defaults).

    The query gets ``query_view`` and the key ``key_view``; the paper's default is a strong
    query and a weak (crop + flip) key, which gives the key cleaner neighbours in the queue.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_brightness: float = 0.4
    jitter_contrast: float = 0.4
    jitter_saturation: float = 0.4
    jitter_hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1
    query_view: str = "strong"
    key_view: str = "weak"

    def __post_init__(self) -> None:
        for name in ("query_view", "key_view"):
            if getattr(self, name) not in VIEWS:
                raise ValueError(f"augment.{name} must be one of {VIEWS}, got {getattr(self, name)!r}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], got {getattr(self, name)}")


def blur_kernel_size(image_size: int, fraction: float = 0.1) -> int:
    """Gaussian blur kernel side: about ``fraction`` of the image, odd, at least 3."""
    k = max(3, int(round(image_size * fraction)))
    return k if k % 2 == 1 else k + 1


def view_transform(view: str, cfg: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    """PIL image -> normalised float tensor [3, S, S] for the ``strong`` or ``weak`` view."""
    from torchvision import transforms as T

    steps: list[Any] = [
        T.RandomResizedCrop(image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(cfg.flip_p),
    ]
    if view == "strong":
        jitter = T.ColorJitter(cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation, cfg.jitter_hue)
        blur = T.GaussianBlur(blur_kernel_size(image_size, cfg.blur_kernel_fraction), sigma=cfg.blur_sigma)
        steps += [
            T.RandomApply([jitter], p=cfg.jitter_p),
            T.RandomGrayscale(p=cfg.grayscale_p),
            T.RandomApply([blur], p=cfg.blur_p),
        ]
    elif view != "weak":
        raise ValueError(f"unknown view {view!r}; choose one of {VIEWS}")
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> Any:
    """PIL image already at the model's size -> normalised float tensor [3, S, S]."""
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])
