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

from ascl.pretrained import AsclHubMixin

# embedding dim = multiplier x base width (the last stage has 8x the base width, x4 for Bottleneck)
ARCHS: dict[str, int] = {"resnet18": 8, "resnet34": 8, "resnet50": 32}
TORCHVISION_WIDTH = 64
STEMS = ("cifar", "imagenet")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

REPO_URL = "https://github.com/ascl-hub/ascl-hub"
PAPER_URL = "https://arxiv.org/abs/2207.11163"


def embedding_dim_of(arch: str, width: int) -> int:
    """Channels of the pooled feature (the embedding) of ``arch`` at base ``width``: 8·width for ResNet-18/34."""
    return ARCHS[arch] * width


def resnet_trunk(arch: str, width: int) -> torchvision.models.ResNet:
    """torchvision's ResNet ``arch`` with base channel width ``width`` (64: torchvision's own, same keys).

    torchvision fixes the base width at 64; for another width the stem and the four stages
    are rebuilt with ``width, 2*width, 4*width, 8*width`` channels through torchvision's own
    ``_make_layer`` and initialised by its rule (Kaiming-normal convs, BN weight 1, bias 0),
    so the module names and the state-dict keys are those of the width-64 network.
    """
    trunk: torchvision.models.ResNet = getattr(torchvision.models, arch)(weights=None)
    if width == TORCHVISION_WIDTH:
        return trunk
    block = type(trunk.layer1[0])
    depths = [len(stage) for stage in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)]
    trunk.inplanes = width
    trunk.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    trunk.bn1 = nn.BatchNorm2d(width)
    trunk.layer1 = trunk._make_layer(block, width, depths[0])
    trunk.layer2 = trunk._make_layer(block, 2 * width, depths[1], stride=2)
    trunk.layer3 = trunk._make_layer(block, 4 * width, depths[2], stride=2)
    trunk.layer4 = trunk._make_layer(block, 8 * width, depths[3], stride=2)
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return trunk


class Encoder(
    nn.Module,
    AsclHubMixin,  # PyTorchModelHubMixin, strict, through its documented hooks (ascl/pretrained.py)
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
        width: base channel width (channels of the stem and the first stage; each later stage
            doubles it). 64 is torchvision's network, keys and initialisation unchanged; 32
            or 16 make a 4x or 16x cheaper network for CPU training. Embedding dim: 8 x width
            for ResNet-18/34, 32 x width for ResNet-50.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        stem: str = "cifar",
        image_size: int = 32,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        width: int = TORCHVISION_WIDTH,
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
        if isinstance(width, bool) or not isinstance(width, int) or not 4 <= width <= 256:
            raise ValueError(f"width must be an integer in [4, 256] (64 = torchvision's ResNet), got {width!r}")
        self.arch = arch
        self.stem = stem
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.width = int(width)
        self.embedding_dim = embedding_dim_of(arch, self.width)

        trunk = resnet_trunk(arch, self.width)
        if stem == "cifar":
            trunk.conv1 = nn.Conv2d(3, self.width, kernel_size=3, stride=1, padding=1, bias=False)
            trunk.maxpool = nn.Identity()
        trunk.fc = nn.Identity()
        self.backbone = trunk
        # Preprocessing constants as non-persistent buffers: they follow .to(device) and trace as
        # constants, and stay out of the state_dict (the weights files hold weights only).
        self.pixel_mean: torch.Tensor
        self.pixel_std: torch.Tensor
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def config(self) -> dict[str, object]:
        """The constructor arguments, as written to ``config.json``."""
        return {
            "arch": self.arch,
            "stem": self.stem,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "width": self.width,
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, un-normalised backbone feature. x: [N, 3, H, W] normalised -> [N, D]."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embedding. x: [N, 3, H, W] normalised float -> [N, D]."""
        return F.normalize(self.forward_features(x), dim=1)

    def normalize_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC [N, H, W, 3] at ``image_size`` -> normalised float NCHW [N, 3, H, W].

        This is the single preprocessing rule shared by PyTorch, the exported graph (traced
        from here by ``ascl.export``) and serving: scale to [0, 1], subtract mean, divide by std.
        """
        if not torch.jit.is_tracing() and (images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3):
            raise ValueError(
                f"expected uint8 images of shape [N, H, W, 3], got {images.dtype} {tuple(images.shape)}"
            )
        x = images.permute(0, 3, 1, 2).float().div(255.0)  # [N, 3, H, W]
        return (x - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def embed_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images -> unit-norm embeddings [N, D] (eval mode is the caller's job)."""
        return self(self.normalize_uint8(images))
