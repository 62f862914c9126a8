"""The order in which training samples are drawn: a pure function of (seed, iteration)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from contrastseg.errors import ConfigError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


class IterationBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for each iteration in ``[start, iters)``, this rank's ``(epoch, index)`` pairs.

    Every epoch is a fresh permutation seeded from ``(seed, epoch)``; the last incomplete batch
    of an epoch is dropped. ``batch_size`` is the global batch; rank r of w takes
    ``batch[r::w]``. Because nothing depends on earlier iterations, a resumed run draws exactly
    the batches the uninterrupted run would have drawn.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        iters: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < batch_size:
            raise ConfigError(
                f"the training split has {num_samples} samples, fewer than train.batch_size "
                f"= {batch_size}: lower train.batch_size or add samples to the split"
            )
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size {batch_size} is not divisible by {world_size} processes: "
                f"make it a multiple of {world_size}"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.iters = iters
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = num_samples // batch_size

    def __len__(self) -> int:
        return max(0, self.iters - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, perm_epoch = None, -1
        for it in range(self.start, self.iters):
            epoch, pos = divmod(it, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(self.num_samples, self.seed, epoch), epoch
            batch = perm[pos * self.batch_size : (pos + 1) * self.batch_size]
            yield [(epoch, int(i)) for i in batch[self.rank :: self.world_size]]


class EpochIndexed(Dataset):
    """Adapts a dataset with ``set_epoch`` to keys ``(epoch, index)``; works in worker processes."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]
