"""Image transforms: timm's for ImageNet-sized inputs, a pad-and-crop recipe for small (<= 64 px) images.

Small images that the model sees larger (CIFAR at 224) are augmented at their native size in the
loader and shipped as uint8; `ResizeNormalize` upsamples and normalises them on the training
device. That is the same augmentation scaled down (padding size/8, crop, flip), at a small
fraction of the loader's CPU time and shared memory per sample.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import DEFAULT_CROP_PCT, create_transform
from torchvision import transforms as T

SMALL_IMAGES = 64  # at or below this native size, random-resized crops destroy the image


def resized_on_device(native_size: int, input_size: int) -> bool:
    """Whether the loader ships native-size uint8 images and the device does the upsampling."""
    return native_size <= SMALL_IMAGES and native_size < input_size


def build_transform(
    data_config: dict[str, Any], native_size: int, is_training: bool, augment: bool, on_device: bool = True
) -> Callable:
    """`data_config` is timm's (input_size, mean, std, interpolation, crop_pct), possibly overridden.

    With `on_device` and a small image shown larger, the transform returns a uint8 (3, native,
    native) tensor and `ResizeNormalize` finishes the job on the device.
    """
    size = data_config["input_size"][-1]
    mean, std = data_config["mean"], data_config["std"]
    interpolation = T.InterpolationMode(data_config.get("interpolation", "bicubic"))
    if native_size <= SMALL_IMAGES:
        if on_device and resized_on_device(native_size, size):
            steps: list[Callable] = [ResizeIfNeeded(native_size, interpolation), T.PILToTensor()]
            if is_training and augment:
                steps.append(PadCropFlip(native_size, padding=native_size // 8))
            return T.Compose(steps)
        steps = [T.Resize(size, interpolation=interpolation), T.CenterCrop(size)]
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


def eval_pipeline(data_config: dict[str, Any], native_size: int) -> dict[str, Any]:
    """What `build_transform` does to an evaluated image, as the keys timm's validate.py prints of its data config:
    input size, interpolation, mean, std, crop_pct and crop_mode. Small images are taken whole (crop_pct 1.0)
    at their native size and resized to the input size."""
    small = native_size <= SMALL_IMAGES
    crop_pct = data_config.get("crop_pct")
    return {
        "input_size": list(data_config["input_size"]),
        "interpolation": data_config.get("interpolation", "bicubic"),
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "crop_pct": 1.0 if small else (crop_pct or DEFAULT_CROP_PCT),  # timm's eval transform: None -> its default
        "crop_mode": "center",
        "native_size": native_size,
    }


class ResizeIfNeeded:
    """Resize (shorter side) and centre-crop a PIL image to `size`, skipping images already that size."""

    def __init__(self, size: int, interpolation: T.InterpolationMode) -> None:
        self.resize, self.crop, self.size = T.Resize(size, interpolation=interpolation), T.CenterCrop(size), size

    def __call__(self, image: Any) -> Any:
        if image.size == (self.size, self.size):
            return image
        return self.crop(self.resize(image))


def reflect_index(start: int, length: int, size: int) -> torch.Tensor:
    """Indices start..start+length-1 into a dimension of `size`, reflected at the borders (as reflect padding)."""
    index = torch.arange(start, start + length).abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


class PadCropFlip:
    """torchvision's RandomCrop(size, padding, reflect) + RandomHorizontalFlip on a (C, H, W) tensor.

    The same random draws in the same order (crop top, crop left, flip) from torch's RNG, but one
    gather of the kept pixels instead of padding the whole image.
    """

    def __init__(self, size: int, padding: int) -> None:
        self.size, self.padding = size, padding

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        top = int(torch.randint(0, height + 2 * self.padding - self.size + 1, size=(1,)).item())
        left = int(torch.randint(0, width + 2 * self.padding - self.size + 1, size=(1,)).item())
        rows = reflect_index(top - self.padding, self.size, height)
        cols = reflect_index(left - self.padding, self.size, width)
        if torch.rand(1) < 0.5:
            cols = cols.flip(0)
        return image[:, rows][:, :, cols]


class ResizeNormalize(nn.Module):
    """uint8 (B, 3, h, w) images -> normalised float (B, 3, size, size), on whatever device they are."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], interpolation: str = "bicubic"):
        super().__init__()
        self.size, self.mode = size, interpolation
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        align = False if self.mode in ("bilinear", "bicubic") else None
        x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, align_corners=align)
        if self.mode == "bicubic":
            x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL clamps to the uint8 range
        return (x - self.mean) / self.std


def device_transform(data_config: dict[str, Any], native_size: int) -> Optional[ResizeNormalize]:
    """The device half of the small-image pipeline, or None when the loader already ships model inputs."""
    size = data_config["input_size"][-1]
    if not resized_on_device(native_size, size):
        return None
    return ResizeNormalize(
        size, tuple(data_config["mean"]), tuple(data_config["std"]), data_config.get("interpolation", "bicubic")
    )
