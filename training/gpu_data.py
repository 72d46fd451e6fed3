"""The fast path's data: images decoded once into a uint8 tensor on the device, two views per
batch made there (``gpu_augment``), no DataLoader workers and no host sync per batch.

CIFAR-10's 50,000 training images are 150 MiB as uint8, so they sit on the GPU for the whole
run; each batch is an index gather plus batched augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from ascl.training.augment import AugmentConfig
from ascl.training.gpu_augment import ViewParams, ViewSpec, apply_view, sample_view, view_specs

ApplyFn = Callable[[torch.Tensor, ViewParams, ViewSpec, int], torch.Tensor]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """One generator seed per (run seed, epoch, rank): reproducible, distinct per epoch and rank."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank) * 104_729) % (2**63 - 1)


def check_views_input(is_uint8: bool, shape: tuple[int, ...], dtype: str, batch_size: int, rank: int,
                      world_size: int, drop_last: bool, mean: Sequence[float], std: Sequence[float]) -> None:
    """ValueError saying what is wrong with a two-view loader's images, batch, rank or normalisation."""
    if not is_uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"images_u8 must be uint8 [N, H, W, 3], got {dtype} {shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if drop_last and shape[0] // world_size < batch_size:
        raise ValueError(f"{shape[0]} images over {world_size} rank(s) cannot fill one batch of {batch_size}; "
                         "lower the batch size or add images")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need 3 values each")


class SeededTwoViews:
    """The order and seeds of a two-view loader, shared by the tensor views and the OpenCV views.

    Each epoch's order is one permutation per (run seed, epoch), split across ranks; each batch
    draws its views from its own seed (run seed, epoch, rank, batch), so resuming mid-epoch is
    exact. Iterating without ``set_epoch`` advances the epoch by one each time. Subclasses set
    ``n_images, batch_size, seed, rank, world_size, drop_last, generator`` and make ``views``.
    """

    n_images: int
    batch_size: int
    seed: int
    rank: int
    world_size: int
    drop_last: bool
    generator: torch.Generator
    _epoch: int = 0
    _start_batch: int = 0

    def views(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __len__(self) -> int:
        per_rank = self.n_images // self.world_size
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Fix the next iteration's epoch (order and augmentation are a function of seed + epoch);
        ``start_batch`` skips the batches a resumed run has already trained on."""
        self._epoch, self._start_batch = int(epoch), int(start_batch)

    def _indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample order for ``epoch``: [len(self) * B] (fewer if not drop_last)."""
        self.generator.manual_seed(epoch_seed(self.seed, epoch))  # same permutation on every rank
        perm = torch.randperm(self.n_images, generator=self.generator, device=self.generator.device)
        per_rank = self.n_images // self.world_size
        return perm[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._start_batch
        self._epoch, self._start_batch = epoch + 1, 0
        order = self._indices(epoch)
        for b in range(start, len(self)):
            # one seed per batch: a resumed epoch sees exactly the views it would have seen
            self.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank + 1) + b)
            yield self.views(order[b * self.batch_size : (b + 1) * self.batch_size])


class GpuTwoViewLoader(SeededTwoViews):
    """Iterates (x_q, x_k) batches of normalised float views made on the images' device.

    Args:
        images_u8: [N, H, W, 3] uint8 on the training device (decoded once).
        batch_size: pairs per batch (per rank).
        image_size: side S of the views.
        mean, std: per-channel normalisation of [0, 1] RGB (the encoder's).
        augment: an ``AugmentConfig`` (None: the paper's default); the query gets the strong
            view, the key the weak one (crop + flip).
        seed: run seed; with the epoch (``set_epoch``) it fixes order and augmentation.
        channels_last: return views in channels_last memory format (faster convs on GPUs).
        drop_last: drop the last incomplete batch (fixed shapes for ``torch.compile``).
        rank, world_size: shard of the epoch's permutation for DistributedDataParallel.
        compile_augment: ``torch.compile`` the (deterministic) augmentation application,
            fusing its ~300 small elementwise kernels; needs a compiler toolchain.

    Iterating without calling ``set_epoch`` advances the epoch by one each time, so a plain
    ``for epoch ...: for batch in loader`` never repeats an epoch's augmentations. Every batch
    draws from its own seed (run seed, epoch, rank, batch), so resuming mid-epoch is exact.
    """

    def __init__(
        self,
        images_u8: torch.Tensor,
        batch_size: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentConfig | None,
        *,
        seed: int,
        channels_last: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        compile_augment: bool = False,
    ) -> None:
        check_views_input(images_u8.dtype == torch.uint8, tuple(images_u8.shape), str(images_u8.dtype), batch_size,
                          rank, world_size, drop_last, mean, std)
        self.images = images_u8
        self.n_images = int(images_u8.shape[0])
        self.batch_size = int(batch_size)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.channels_last = channels_last
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.strong, self.weak = view_specs(augment, image_size)
        device = images_u8.device
        self.mean = torch.tensor([float(m) for m in mean], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([float(s) for s in std], device=device).view(1, 3, 1, 1)
        self.generator = torch.Generator(device=device)
        self._apply: ApplyFn = torch.compile(apply_view, dynamic=False) if compile_augment else apply_view  # type: ignore[assignment]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def views(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (strong query, weak key) views of images ``idx``: two [B, 3, S, S] floats."""
        x = self.images.index_select(0, idx).permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, H, W]
        n, _, height, width = x.shape
        q_params = sample_view(self.strong, n, height, width, self.generator, self.device)
        k_params = sample_view(self.weak, n, height, width, self.generator, self.device)
        x_q = self._apply(x, q_params, self.strong, self.image_size)
        x_k = self._apply(x, k_params, self.weak, self.image_size)
        return self._normalise(x_q), self._normalise(x_k)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)
