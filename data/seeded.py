"""Augmentation randomness that depends on (seed, epoch, sample), not on which worker draws it.

A DataLoader worker's RNG advances with every sample it transforms, so which crop a sample gets
depends on which worker loaded it and what it loaded before. A run resumed mid-epoch skips the
batches already trained, shifting that assignment. Seeding every sample's transform from
(seed, epoch, index) makes the augmentation the same for any worker count and after a resume.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index), well spread by a SplitMix64 step."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 1


@contextmanager
def seeded_rngs(seed: int, restore: bool = True) -> Iterator[None]:
    """Seed torch's CPU generator, random and numpy (what torchvision's and timm's transforms draw from).

    With `restore`, their previous states come back afterwards (needed in the training process
    itself; a loader worker's own RNG state matters to nobody, and restoring costs ~60 us a sample).
    """
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()) if restore else None
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also touch CUDA (slow)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if states is not None:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])


class EpochSeeded(Dataset):
    """Wraps a data set so that sample i of epoch e is transformed with the RNGs seeded by (seed, e, i).

    Call `set_epoch(e)` before creating the epoch's DataLoader iterator (workers copy the data set then).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        in_worker = get_worker_info() is not None
        with seeded_rngs(sample_seed(self.seed, self.epoch, index), restore=not in_worker):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # classes, targets, ... of the wrapped data set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
