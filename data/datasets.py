"""Build train/val datasets from the `dataset` config group."""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from .synthetic import SyntheticPatterns
from .transforms import build_transform

DATASETS = ("cifar10", "cifar100", "imagenet", "imagefolder", "synthetic")


class DatasetError(RuntimeError):
    """A data set cannot be found, read or downloaded; the message says how to fix it."""


def load_image(path: str) -> Image.Image:
    """ImageFolder's loader, with an error that names the unreadable file."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot read image {path} ({err}); delete or replace the file") from err


def _cifar(cfg: Mapping[str, Any], train: bool, transform: Callable) -> Dataset:
    cls = tvd.CIFAR10 if cfg["name"] == "cifar10" else tvd.CIFAR100
    root = str(cfg["root"])
    try:
        return cls(root, train=train, transform=transform, download=bool(cfg["download"]))
    except RuntimeError as err:  # torchvision: not found or corrupted
        raise DatasetError(
            f"{cfg['name']} not found in {root} ({err}); set dataset.download=true or dataset.root=DIR "
            f"holding {cls.base_folder}/"
        ) from err
    except OSError as err:  # URLError, socket errors: no network
        raise DatasetError(
            f"could not download {cfg['name']} into {root} ({err}); without network, copy {cls.filename} "
            f"(or the extracted {cls.base_folder}/) there and rerun"
        ) from err


def _image_folder(cfg: Mapping[str, Any], split: str, transform: Callable) -> Dataset:
    root = cfg["root"]
    if root in (None, "", "???"):
        raise DatasetError(f"dataset={cfg['name']} needs a folder: add dataset.root=DIR (with train/ and val/)")
    candidates = ["train"] if split == "train" else ["val", "test"]
    for name in candidates:
        folder = os.path.join(str(root), name)
        if os.path.isdir(folder):
            try:
                return tvd.ImageFolder(folder, transform=transform, loader=load_image)
            except FileNotFoundError as err:
                raise DatasetError(f"{folder} holds no class folders with images ({err})") from err
    raise DatasetError(
        f"dataset folder {os.path.join(str(root), ' or '.join(candidates))} does not exist; "
        f"set dataset.root to a folder with train/ and val/ class folders"
    )


def build_datasets(cfg: Mapping[str, Any], data_config: dict[str, Any], augment: bool = True,
                   splits: tuple[str, ...] = ("train", "val"), seed: int = 0) -> dict[str, Dataset]:
    """Return {split: dataset} for the requested splits ('train', 'val')."""
    name = cfg["name"]
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    out: dict[str, Dataset] = {}
    for split in splits:
        train = split == "train"
        if name == "synthetic":
            size = cfg["train_size"] if train else cfg["val_size"]
            out[split] = SyntheticPatterns(size, cfg["num_classes"], data_config["input_size"][-1],
                                           cfg["noise"], seed=seed * 2 + (0 if train else 1))
            continue
        transform = build_transform(data_config, cfg["img_size"], is_training=train, augment=augment)
        out[split] = _cifar(cfg, train, transform) if name.startswith("cifar") else _image_folder(cfg, split, transform)
    return out


def num_classes_of(dataset: Dataset) -> int:
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise DatasetError(f"cannot tell the number of classes of {type(dataset).__name__}; set dataset.num_classes")
    return len(classes)
