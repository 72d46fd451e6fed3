"""The encoder that ships: a torchvision ResNet trunk whose pooled feature is the embedding.

Only this module is published; the training wrapper (queue, momentum encoder, heads) never is.
Constructor arguments are primitives so ``PyTorchModelHubMixin`` writes ``config.json`` itself,
and the encoder carries its own preprocessing facts (image size, mean, std) so that export and
serving never guess them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ascl.hub_mixin import AsclHubMixin

ARCHS: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
STEMS = ("cifar", "imagenet")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

REPO_URL = "https://github.com/ascl-hub/ascl-hub"
PAPER_URL = "https://arxiv.org/abs/2207.11163"


class Encoder(
    nn.Module,
    AsclHubMixin,  # PyTorchModelHubMixin, made strict and shard-aware (ascl/hub_mixin.py)
    library_name="ascl-hub",
    tags=["ascl", "self-supervised", "contrastive-learning", "image-feature-extraction", "image-retrieval"],
    license="apache-2.0",
    repo_url=REPO_URL,
    paper_url=PAPER_URL,
    pipeline_tag="image-feature-extraction",
):
    """ResNet backbone whose global-average-pooled feature, L2-normalised, is the embedding.

    Args:
        arch: ``resnet18`` | ``resnet34`` | ``resnet50``.
        stem: ``cifar`` (3x3 conv stride 1, no max-pool: for 32-96 px images) or ``imagenet``
            (7x7 conv stride 2 + max-pool: for 160 px and larger).
        image_size: side of the square input the encoder was trained at.
        mean, std: per-channel normalisation applied to [0, 1] RGB inputs.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        stem: str = "cifar",
        image_size: int = 32,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {list(STEMS)}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError("mean and std need 3 values each, std > 0")
        self.arch = arch
        self.stem = stem
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.embedding_dim = ARCHS[arch]

        trunk = getattr(torchvision.models, arch)(weights=None)
        if stem == "cifar":
            trunk.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            trunk.maxpool = nn.Identity()
        trunk.fc = nn.Identity()
        self.backbone = trunk

    def config(self) -> dict[str, object]:
        """The constructor arguments, as written to ``config.json``."""
        return {
            "arch": self.arch,
            "stem": self.stem,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, un-normalised backbone feature. x: [N, 3, H, W] normalised -> [N, D]."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embedding. x: [N, 3, H, W] normalised float -> [N, D]."""
        return F.normalize(self.forward_features(x), dim=1)

    def normalize_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC [N, H, W, 3] at ``image_size`` -> normalised float NCHW [N, 3, H, W].

        This is the single preprocessing rule shared by PyTorch, the exported graph and
        serving: scale to [0, 1], subtract mean, divide by std.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 images of shape [N, H, W, 3], got {images.dtype} {tuple(images.shape)}"
            )
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        x = images.permute(0, 3, 1, 2).float().div(255.0)  # [N, 3, H, W]
        return (x - mean) / std

    @torch.no_grad()
    def embed_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images -> unit-norm embeddings [N, D] (eval mode is the caller's job)."""
        return self(self.normalize_uint8(images))
