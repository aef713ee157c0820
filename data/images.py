"""The images a task looks at: images=PATH (a file or a folder of images), else the data set's validation split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from .datasets import DatasetError, build_datasets, native_size
from .transforms import build_transform

log = logging.getLogger(__name__)


def load_images(
    cfg: DictConfig,
    inputs: dict[str, Any],
    classes: Optional[list[str]],
    count: int,
    folder_limit_key: Optional[str] = None,
) -> list[tuple[str, torch.Tensor, Optional[int]]]:
    """(name, image tensor, true label or None) for images=PATH (file or folder) or the data set's val split:
    `count` samples of the split; of a folder, all of its images, or the first `count` when
    `folder_limit_key` (the config key that sets `count`) is given."""
    size = native_size(cfg.dataset)
    transform = build_transform(inputs, native_size=size, is_training=False, augment=False, on_device=False)
    if cfg.images:
        root = Path(str(cfg.images))
        if not root.exists():
            raise DatasetError(f"images={root} does not exist; give an image file or a folder of images")
        # the suffixes an image folder's ImageFolder takes: one list (torchvision's) for both
        files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise DatasetError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {root}")
        if folder_limit_key and len(files) > count:
            log.info(
                "images=%s: the first %d of its %d images (%s=%d; %s=%d draws them all)",
                root,
                count,
                len(files),
                folder_limit_key,
                count,
                folder_limit_key,
                len(files),
            )
            files = files[:count]
        out = []
        for file in files:
            try:
                out.append((file.stem, transform(Image.open(file).convert("RGB")), None))
            except OSError as err:
                raise DatasetError(f"cannot read image {file} ({err})") from err
        return out
    dataset = build_datasets(
        cfg.dataset, inputs, augment=False, splits=("val",), seed=cfg.seed, on_device=False, classes=classes
    )["val"]
    count = min(count, len(dataset))
    return [(f"sample_{i}", *dataset[i]) for i in range(count)]
