"""The reference data path: PIL two-view augmentation in DataLoader workers.

Each sample's augmentation is seeded by (seed, epoch, index), and each epoch's order by
(seed, epoch), so a run resumed mid-epoch sees exactly the batches it would have seen, with
any number of workers. The GPU path (``ascl.training.gpu_data``) is the fast alternative.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ascl.training.augment import AugmentConfig, view_transform


class EpochBatchSampler:
    """Batches of (epoch, index) pairs: a fresh permutation per epoch, this rank's share, drop_last."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return (self.n // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[self.rank :: self.world_size].tolist()
        for b in range(self.start_batch, len(self)):
            yield [(self.epoch, i) for i in perm[b * self.batch_size : (b + 1) * self.batch_size]]


class TwoViewDataset(Dataset):
    """uint8 images [N, S, S, 3] -> (query view, key view), each normalised [3, S, S]."""

    def __init__(self, images: np.ndarray, query_tf: object, key_tf: object, seed: int) -> None:
        self.images, self.query_tf, self.key_tf, self.seed = images, query_tf, key_tf, seed

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            image = Image.fromarray(self.images[index])
            return self.query_tf(image), self.key_tf(image)  # type: ignore[operator]


class ReferenceTwoViewLoader:
    """Iterable of (x_q, x_k) float batches [B, 3, S, S]; ``set_epoch(e, start_batch)`` before each epoch."""

    def __init__(
        self,
        images: np.ndarray,
        batch_size: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentConfig,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        query_tf = view_transform(augment.query_view, augment, image_size, mean, std)
        key_tf = view_transform(augment.key_view, augment, image_size, mean, std)
        self.sampler = EpochBatchSampler(len(images), batch_size, seed, rank, world_size)
        self.loader = DataLoader(
            TwoViewDataset(images, query_tf, key_tf, seed),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed),  # keeps the global RNG (saved for resume) untouched
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)
