"""Build the training framework a config names: Encoder + injected loss + MoCo or BYOL."""

from __future__ import annotations

from torch import nn

from ascl.encoder import Encoder
from ascl.training.byol import BYOL
from ascl.training.config import TrainConfig
from ascl.training.loss import ASCLLoss, BYOLRegressionLoss, InBatchASCLLoss
from ascl.training.moco import MoCo


def build_encoder(cfg: TrainConfig, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> Encoder:
    """The Encoder that ships, with the run's preprocessing facts."""
    kwargs = {} if mean is None or std is None else {"mean": mean, "std": std}
    return Encoder(arch=cfg.model.arch, stem=cfg.model.stem, image_size=cfg.data.image_size, width=cfg.model.width,
                   **kwargs)  # type: ignore[arg-type]


def build_framework(cfg: TrainConfig, encoder: Encoder | None = None) -> nn.Module:
    """MoCo or BYOL with the configured loss; ``framework.encoder`` is the Encoder that ships."""
    enc = encoder if encoder is not None else build_encoder(cfg)
    m, lc = cfg.model, cfg.loss
    if cfg.framework == "moco":
        return MoCo(
            enc,
            ASCLLoss(lc.t1, lc.t2, lc.n_neighbors, lc.mode),
            head_hidden=m.head_hidden,
            head_dim=m.head_dim,
            queue_size=cfg.moco.queue_size,
            momentum=cfg.moco.momentum,
            bn_splits=m.bn_splits,
        )
    if cfg.framework == "byol":
        loss: nn.Module = BYOLRegressionLoss() if lc.mode == "none" else InBatchASCLLoss(lc.t1, lc.t2, lc.n_neighbors, lc.mode)
        return BYOL(
            enc,
            loss,  # type: ignore[arg-type]
            head_hidden=m.head_hidden,
            head_dim=m.head_dim,
            pred_hidden=m.pred_hidden,
            momentum=cfg.byol.momentum,
            bn_splits=m.bn_splits,
        )
    raise ValueError(f"unknown framework {cfg.framework!r}; choose moco or byol")
