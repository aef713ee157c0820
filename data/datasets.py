"""Build train/val datasets from the `dataset` config group."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision.datasets.folder import find_classes

from .synthetic import SyntheticPatterns
from .transforms import ResizeNormalize, build_transform, device_transform

DATASETS = ("cifar10", "cifar100", "imagenet", "imagefolder", "synthetic")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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


def _root(cfg: Mapping[str, Any]) -> str:
    root = cfg.get("root") if not _missing(cfg, "root") else None
    if root in (None, ""):
        raise DatasetError(f"dataset={cfg['name']} needs a folder: add dataset.root=DIR (with train/ and val/)")
    return str(root)


def _missing(cfg: Mapping[str, Any], key: str) -> bool:
    """True for a mandatory config value ('???') that was not given."""
    is_missing = getattr(cfg, "_get_node", None)
    if is_missing is not None:
        node = cfg._get_node(key)
        return node is not None and node._is_missing()
    return cfg.get(key) == "???"


def _image_folder(
    cfg: Mapping[str, Any], split: str, transform: Callable, classes: Optional[list[str]] = None
) -> Dataset:
    """train/ (or val/, test/) of dataset.root as an ImageFolder whose labels follow `classes`.

    ImageFolder numbers the classes of each folder on its own; a val/ that lacks one of train/'s
    classes would shift every later label. Labels are the index of the class name in `classes`
    (train/'s classes), and a class that train/ lacks is refused by name."""
    root = _root(cfg)
    candidates = ["train"] if split == "train" else ["val", "test"]
    for name in candidates:
        folder = os.path.join(str(root), name)
        if not os.path.isdir(folder):
            continue
        try:
            dataset = tvd.ImageFolder(folder, transform=transform, loader=load_image)
        except FileNotFoundError as err:
            raise DatasetError(f"{folder} holds no class folders with images ({err})") from err
        if classes is not None and dataset.classes != list(classes):
            _relabel(dataset, list(classes), folder)
        return dataset
    raise DatasetError(
        f"dataset folder {os.path.join(str(root), ' or '.join(candidates))} does not exist; "
        f"set dataset.root to a folder with train/ and val/ class folders"
    )


def _relabel(dataset: tvd.ImageFolder, classes: list[str], folder: str) -> None:
    unknown = [c for c in dataset.classes if c not in classes]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DatasetError(
            f"{folder} holds classes the model was not trained on ({shown}); remove them or add them to train/"
        )
    index = {name: i for i, name in enumerate(classes)}
    own = dataset.classes
    dataset.samples = [(path, index[own[label]]) for path, label in dataset.samples]
    dataset.imgs = dataset.samples
    dataset.targets = [label for _, label in dataset.samples]
    dataset.classes, dataset.class_to_idx = list(classes), index


def class_names(cfg: Mapping[str, Any]) -> Optional[list[str]]:
    """The class names, in label order: an image folder's train/ classes, CIFAR-10's ten, the synthetic
    patterns; None where they cannot be known without the data (CIFAR-100 before download)."""
    name = cfg["name"]
    if name == "cifar10":
        return list(CIFAR10_CLASSES)
    if name == "synthetic":
        return [f"pattern_{c}" for c in range(int(cfg["num_classes"]))]
    if name in ("imagefolder", "imagenet"):
        folder = os.path.join(_root(cfg), "train")
        if os.path.isdir(folder):
            return find_classes(folder)[0]
    return None


def build_datasets(
    cfg: Mapping[str, Any],
    data_config: dict[str, Any],
    augment: bool = True,
    splits: tuple[str, ...] = ("train", "val"),
    seed: int = 0,
    on_device: bool = True,
    classes: Optional[list[str]] = None,
) -> dict[str, Dataset]:
    """Return {split: dataset} for the requested splits ('train', 'val').

    With `on_device`, small images shown larger come out as native-size uint8: pass each batch
    through `input_transform(cfg, data_config)` on the device. `classes`: the label order of an
    image folder (default: its train/ classes; a checkpoint's own when evaluating one).
    """
    name = cfg["name"]
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    out: dict[str, Dataset] = {}
    for split in splits:
        train = split == "train"
        if name == "synthetic":
            size = cfg["train_size"] if train else cfg["val_size"]
            out[split] = SyntheticPatterns(
                size,
                cfg["num_classes"],
                data_config["input_size"][-1],
                cfg["noise"],
                seed=seed * 2 + (0 if train else 1),
            )
            continue
        transform = build_transform(
            data_config, cfg["native_size"], is_training=train, augment=augment, on_device=on_device
        )
        if name.startswith("cifar"):
            out[split] = _cifar(cfg, train, transform)
        else:
            out[split] = _image_folder(cfg, split, transform, classes if classes is not None else class_names(cfg))
    return out


def input_transform(cfg: Mapping[str, Any], data_config: dict[str, Any]) -> Optional[ResizeNormalize]:
    """What the device does to a batch of `build_datasets(..., on_device=True)` before the model, or None."""
    if cfg["name"] == "synthetic":  # generated at the input size already
        return None
    return device_transform(data_config, int(cfg["native_size"]))


def count_classes(cfg: Mapping[str, Any]) -> int:
    """dataset.num_classes, or for an image folder the number of class folders in its train/ split."""
    if cfg.get("num_classes"):
        return int(cfg["num_classes"])
    root = _root(cfg)
    folder = os.path.join(str(root), "train")
    try:
        classes, _ = find_classes(folder)
    except (FileNotFoundError, OSError) as err:
        raise DatasetError(
            f"cannot count the classes in {folder} ({err}); set dataset.root to a folder with "
            "train/<class>/ folders, or set dataset.num_classes"
        ) from err
    return len(classes)
