"""A small generated data set that a ViT can learn: each class is a fixed pattern plus noise."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticPatterns(Dataset):
    """Images (3, size, size): class template (a smooth random pattern) + Gaussian noise.

    Sample i is the same on every call (its noise is seeded by `seed` and i), so data order is
    the only randomness a training run sees from it.
    """

    def __init__(self, num_samples: int, num_classes: int, img_size: int, noise: float = 0.5, seed: int = 0) -> None:
        self.num_samples, self.num_classes, self.noise, self.seed = num_samples, num_classes, noise, seed
        g = torch.Generator().manual_seed(1234)  # templates are shared by train and val splits
        coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
        self.templates = torch.nn.functional.interpolate(coarse, size=img_size, mode="bilinear", align_corners=False)
        self.targets = [i % num_classes for i in range(num_samples)]
        self.classes = [f"pattern_{c}" for c in range(num_classes)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.targets[index]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = self.templates[label] + self.noise * torch.randn(self.templates.shape[1:], generator=g)
        return image, label
