"""The torch Dataset the trainer iterates: a source (raw samples) and a joint transform."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from contrastseg.errors import DataError


class Source(Protocol):
    """What a raw data source offers: (image (H, W, 3) uint8, mask (H, W) uint8) samples."""

    classes: list[str]
    palette: np.ndarray

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...
    def name(self, index: int) -> str: ...


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The transform generator's seed for ``(seed, epoch, index)``: a 63-bit integer."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SegmentationDataset(Dataset):
    """``source`` + ``transform``; item ``i`` is ``dict(image (3, h, w) float32,
    mask (h, w) int64, index i)``.

    The transform's generator is seeded from ``(seed, epoch, i)``, so a given epoch and index
    always get the same augmentation, whichever worker loads it and in whatever order.
    """

    def __init__(self, source: Source, transform, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DataError(f"dataset seed must be an integer >= 0, got {seed!r}")
        self.source = source
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise DataError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def palette(self) -> np.ndarray:
        return self.source.palette

    @property
    def num_classes(self) -> int:
        return len(self.source.classes)

    def name(self, index: int) -> str:
        return self.source.name(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"sample index must be an integer, got {type(index).__name__}")
        index = int(index)
        if not 0 <= index < len(self.source):
            raise IndexError(f"sample index {index} out of range for {len(self.source)} samples")
        try:
            image, mask = self.source[index]
        except Exception as exc:
            try:
                name = self.source.name(index)
            except Exception:
                name = f"#{index}"
            raise DataError(f"sample {name!r} (index {index}): {exc}") from exc
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        image_t, mask_t = self.transform(image, mask, generator)
        return {"image": image_t, "mask": mask_t, "index": index}
