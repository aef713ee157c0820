"""Build train/val datasets from the `dataset` config group."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from typing import Any, Callable, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from .synthetic import SyntheticPatterns
from .transforms import SMALL_IMAGES, ResizeNormalize, build_transform, device_transform, eval_pipeline

log = logging.getLogger(__name__)
DATASETS = ("cifar10", "cifar100", "imagenet", "imagefolder", "synthetic")
DEFAULT_NATIVE_SIZE = 224  # an image folder's size when none can be read
FOLDERS = ("imagefolder", "imagenet")  # data sets read from class folders
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DatasetError(RuntimeError):
    """A data set cannot be found, read or downloaded; the message says how to fix it."""


def load_image(path: str) -> Image.Image:
    """ImageFolder's loader, with an error that names the unreadable file."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DatasetError(
            f"cannot read image {path} ({err}); delete or replace the file, or set dataset.skip_unreadable=true"
        ) from err


class ImageFolderOrSkip(tvd.ImageFolder):
    """ImageFolder whose unreadable images stop the run naming the file, or with dataset.skip_unreadable=true
    are skipped: the next readable image of the folder takes the sample's place (batches keep their size),
    and each skip is one log line with the count so far."""

    def __init__(self, *args: Any, skip_unreadable: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_unreadable, self.skipped = skip_unreadable, 0

    def __getitem__(self, index: int) -> Any:
        for offset in range(len(self)):
            try:
                return super().__getitem__((index + offset) % len(self))
            except DatasetError as err:
                if not self.skip_unreadable:
                    raise
                self.skipped += 1
                log.warning("skipped (dataset.skip_unreadable=true, %d so far in this process): %s", self.skipped, err)
        raise DatasetError(f"no image of {self.root} can be read; check the folder")


def _cifar(cfg: Mapping[str, Any], train: bool, transform: Callable) -> Dataset:
    cls = tvd.CIFAR10 if cfg["name"] == "cifar10" else tvd.CIFAR100
    root = str(cfg["root"])
    other_way = "or train on class folders of your own with dataset=imagefolder dataset.root=DIR"
    left_before = _entries(root)
    try:
        return cls(root, train=train, transform=transform, download=bool(cfg["download"]))
    except RuntimeError as err:  # torchvision: not found or corrupted
        _remove_new_entries(root, left_before)
        raise DatasetError(
            f"{cfg['name']} not found in {root} ({err}); set dataset.download=true, copy {cls.filename} into "
            f"{root}/, {other_way}"
        ) from err
    except OSError as err:  # URLError, socket errors: no network
        _remove_new_entries(root, left_before)
        raise DatasetError(
            f"could not download {cfg['name']} into {root} ({err}); without network, copy {cls.filename} "
            f"(or the extracted {cls.base_folder}/) into {root}/, {other_way}"
        ) from err


def _entries(root: str) -> tuple[Optional[str], set[str]]:
    """The highest folder of `root`'s path that does not exist yet (a download would make it), and what
    `root` holds now."""
    missing, path = None, os.path.abspath(root)
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing, set(os.listdir(root)) if os.path.isdir(root) else set()


def _remove_new_entries(root: str, before: tuple[Optional[str], set[str]]) -> None:
    """After a failed download: remove what it left (folders it made, a partial archive)."""
    made, entries = before
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for name in set(os.listdir(root)) - entries if os.path.isdir(root) else ():
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _root(cfg: Mapping[str, Any]) -> str:
    root = cfg.get("root") if not _missing(cfg, "root") else None
    if root in (None, ""):
        raise DatasetError(f"dataset={cfg['name']} needs a folder: add dataset.root=DIR (with train/ and val/)")
    return str(root)


def _missing(cfg: Mapping[str, Any], key: str) -> bool:
    """True for a mandatory config value ('???') that was not given."""
    if isinstance(cfg, DictConfig):
        return key in cfg.keys() and OmegaConf.is_missing(cfg, key)
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
            skip = split == "train" and bool(cfg.get("skip_unreadable", False))  # evaluation counts every image
            dataset = ImageFolderOrSkip(folder, transform=transform, loader=load_image, skip_unreadable=skip)
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
        known = ", ".join(classes[:10]) + (f" and {len(classes) - 10} more" if len(classes) > 10 else "")
        raise DatasetError(
            f"{folder} holds classes the model was not trained on ({shown}); it knows {len(classes)} classes "
            f"({known}): evaluate on a folder of those only (a subset of them works), or, for a new training, "
            "add the others to train/"
        )
    index = {name: i for i, name in enumerate(classes)}
    own = dataset.classes
    dataset.samples = [(path, index[own[label]]) for path, label in dataset.samples]
    dataset.imgs = dataset.samples
    dataset.targets = [label for _, label in dataset.samples]
    dataset.classes, dataset.class_to_idx = list(classes), index


def class_names(cfg: Mapping[str, Any]) -> Optional[list[str]]:
    """The class names, in label order: an image folder's train/ classes (val/'s or test/'s without a train/),
    CIFAR-10's ten, the synthetic patterns; None where they cannot be known without the data (CIFAR-100
    before download)."""
    name = cfg["name"]
    if name == "cifar10":
        return list(CIFAR10_CLASSES)
    if name == "synthetic":
        return [f"pattern_{c}" for c in range(int(cfg["num_classes"]))]
    if name in ("imagefolder", "imagenet"):
        folder = os.path.join(_root(cfg), _first_split(cfg))
        if os.path.isdir(folder):
            return _class_folders(folder)
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
            data_config, native_size(cfg), is_training=train, augment=augment, on_device=on_device
        )
        if name.startswith("cifar"):
            out[split] = _cifar(cfg, train, transform)
        else:
            out[split] = _image_folder(cfg, split, transform, classes if classes is not None else class_names(cfg))
    return out


def preprocessing(cfg: Mapping[str, Any], data_config: dict[str, Any]) -> dict[str, Any]:
    """The images as they go into the model at evaluation (a training run's validation, eval, export, visualize),
    for results.json. Synthetic patterns are generated at the input size: no resize, crop or normalisation."""
    if cfg["name"] == "synthetic":
        keys = ("interpolation", "mean", "std", "crop_pct", "crop_mode", "native_size")
        return {"input_size": list(data_config["input_size"]), **dict.fromkeys(keys)}
    return eval_pipeline(data_config, native_size(cfg))


def input_transform(cfg: Mapping[str, Any], data_config: dict[str, Any]) -> Optional[ResizeNormalize]:
    """What the device does to a batch of `build_datasets(..., on_device=True)` before the model, or None."""
    if cfg["name"] == "synthetic":  # generated at the input size already
        return None
    return device_transform(data_config, native_size(cfg))


def count_classes(cfg: Mapping[str, Any]) -> int:
    """dataset.num_classes, or for an image folder the number of class folders in its train/ split (val/ or
    test/ where it has no train/: enough to evaluate on; at least two, each holding images: DatasetError naming
    the fix otherwise)."""
    if cfg.get("num_classes"):
        return int(cfg["num_classes"])
    folder = os.path.join(_root(cfg), _first_split(cfg))
    classes = _class_folders(folder)
    if len(classes) < 2:
        raise DatasetError(
            f"{folder} holds {len(classes)} class folder{'s' if len(classes) != 1 else ''} "
            f"({', '.join(classes) or 'none'}): a classifier needs at least two classes, one "
            "folder of images each (train/<class>/*.jpg)"
        )
    return len(classes)


def _class_folders(folder: str) -> list[str]:
    """The class folders of `folder` (sorted, as ImageFolder numbers them), each checked to hold an image."""
    try:
        classes, _ = find_classes(folder)
    except (FileNotFoundError, OSError) as err:
        raise DatasetError(
            f"cannot read the class folders of {folder} ({err}); set dataset.root to a folder with "
            "train/<class>/ and val/<class>/ folders of images"
        ) from err
    empty = [name for name in classes if not _holds_an_image(os.path.join(folder, name))]
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise DatasetError(f"class folders without images in {folder}: {shown}; add images or remove the folders")
    return classes


def _holds_an_image(folder: str) -> bool:
    """True as soon as one file with an image extension is found (ImageNet's folders are not listed whole)."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(name.lower().endswith(IMG_EXTENSIONS) for name in files):
            return True
    return False


def native_size(cfg: Mapping[str, Any]) -> int:
    """dataset.native_size, or for an image folder that does not give it, the size read from its images."""
    if cfg.get("native_size") is not None:
        return int(cfg["native_size"])
    sizes = _sample_sizes(os.path.join(_root(cfg), _first_split(cfg))) if cfg["name"] in FOLDERS else []
    return _typical_size(sizes)[1] if sizes else DEFAULT_NATIVE_SIZE


def _first_split(cfg: Mapping[str, Any]) -> str:
    """train/, else val/, else test/: the split of an image folder whose classes and image size are read."""
    return next((name for name in ("train", "val", "test") if os.path.isdir(os.path.join(_root(cfg), name))), "train")


def resolve_native_size(cfg: Any) -> Optional[str]:
    """Fill in dataset.native_size from the images when it is not given (image folders), and refuse a given
    size the images cannot take; returns what was found, for the run's log (None: nothing to say)."""
    if cfg["name"] not in FOLDERS:
        return None
    split = _first_split(cfg)
    sizes = _sample_sizes(os.path.join(_root(cfg), split))
    if not sizes:
        if cfg.get("native_size") is None:
            cfg["native_size"] = DEFAULT_NATIVE_SIZE
            return f"dataset.native_size={DEFAULT_NATIVE_SIZE}: no images found to read it from in {cfg['root']}"
        return None
    found, typical = _typical_size(sizes)
    given = cfg.get("native_size")
    if given is None:
        cfg["native_size"] = typical
        return f"dataset.native_size={typical}, read from the images of {cfg['root']}/{split} ({found})"
    if int(given) > SMALL_IMAGES >= typical:
        raise DatasetError(
            f"dataset.native_size={given} but the images of {cfg['root']}/{split} are small ({found}): "
            "drop dataset.native_size (it is read from the images) "
            f"or set dataset.native_size={typical}"
        )
    return None


def _sample_sizes(folder: str, per_class: int = 4, limit: int = 64) -> list[tuple[int, int]]:
    """(width, height) of the first images of each class folder (headers only), at most `limit`."""
    sizes: list[tuple[int, int]] = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        class_dir = os.path.join(folder, name)
        if not os.path.isdir(class_dir):
            continue
        files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMG_EXTENSIONS))[:per_class]
        for file in files:
            try:
                with Image.open(os.path.join(class_dir, file)) as image:
                    sizes.append(image.size)
            except (OSError, UnidentifiedImageError):
                continue  # an unreadable image is reported by the loader, naming the file
        if len(sizes) >= limit:
            break
    return sizes


def _typical_size(sizes: list[tuple[int, int]]) -> tuple[str, int]:
    """A description of the sizes and the size to use: the common shorter side, else the median."""
    shorter = sorted(min(size) for size in sizes)
    common, count = Counter(shorter).most_common(1)[0]
    if count == len(shorter):
        width, height = sizes[0]
        same = all(size == sizes[0] for size in sizes)
        return (
            f"{len(sizes)} sampled, all {width}x{height}" if same else f"{len(sizes)} sampled, shorter side {common} px"
        ), common
    if 2 * count > len(shorter):
        return f"{count} of {len(sizes)} sampled with shorter side {common} px", common
    median = shorter[len(shorter) // 2]
    return f"{len(sizes)} sampled, shorter sides {shorter[0]}-{shorter[-1]} px: the median, {median}", median
