"""A sampler that a resumed run can start in the middle of an epoch."""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import DistributedSampler, Sampler


class ResumableSampler(Sampler[int]):
    """DistributedSampler (shuffled per epoch with set_epoch) that can skip the samples already done."""

    def __init__(self, sampler: DistributedSampler, skip: int = 0) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)
