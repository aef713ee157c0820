"""Image transforms: timm's for ImageNet-sized inputs, a pad-and-crop recipe for 32x32 sets."""
from __future__ import annotations

from typing import Any, Callable

from timm.data import create_transform
from torchvision import transforms as T

SMALL_IMAGES = 64  # at or below this native size, random-resized crops destroy the image


def build_transform(data_config: dict[str, Any], native_size: int, is_training: bool, augment: bool) -> Callable:
    """`data_config` is timm's (input_size, mean, std, interpolation, crop_pct), possibly overridden."""
    size = data_config["input_size"][-1]
    mean, std = data_config["mean"], data_config["std"]
    interpolation = T.InterpolationMode(data_config.get("interpolation", "bicubic"))
    if native_size <= SMALL_IMAGES:
        steps: list[Callable] = [T.Resize(size, interpolation=interpolation), T.CenterCrop(size)]
        if is_training and augment:
            steps += [T.RandomCrop(size, padding=size // 8, padding_mode="reflect"), T.RandomHorizontalFlip()]
        return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
    return create_transform(
        input_size=data_config["input_size"],
        is_training=is_training and augment,
        mean=mean,
        std=std,
        interpolation=data_config.get("interpolation", "bicubic"),
        crop_pct=data_config.get("crop_pct"),
        auto_augment="rand-m9-mstd0.5-inc1" if is_training and augment else None,
    )
