"""Rebuild a run from a checkpoint's saved config, keeping what this command line says explicitly."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from data import DatasetError, class_names, count_classes

from ..errors import UserError
from .checkpoint import SavedRun, check_same_architecture, read_checkpoint


def override_keys(overrides: Iterable[str]) -> list[str]:
    """'tome.r=16' -> 'tome.r'; '+x=1' -> 'x'; 'dataset=cifar100' -> 'dataset'."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def overridable(key: str, groups: Iterable[str]) -> bool:
    """True for a key of one of `groups` ('trainer' takes 'trainer.lr'), or one named in it whole."""
    groups = tuple(groups)
    return key.split(".", 1)[0] in groups or key in groups


def apply_overrides(
    saved: DictConfig, current: DictConfig, overrides: Iterable[str], groups: Iterable[str]
) -> DictConfig:
    """`saved`, with the keys the command line set taken from `current` where they are `overridable` by
    `groups` (group names, or single keys such as 'dataset.skip_unreadable'); a group switch (dataset=cifar100)
    replaces the whole group."""
    result, groups = saved.copy(), tuple(groups)
    for key in override_keys(overrides):
        if overridable(key, groups):
            OmegaConf.update(result, key, OmegaConf.select(current, key), merge=False, force_add=True)
    return result


def config_from_checkpoint(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Optional[SavedRun]]:
    """With ckpt=PATH: take model, dataset and tome from the checkpoint's saved config (keys set on
    this command line win); return it and the checkpoint as `read_checkpoint` reads it (None without ckpt=)."""
    if not cfg.get("ckpt"):
        return cfg, None
    run = read_checkpoint(cfg.ckpt)
    saved = run.config
    effective = apply_overrides(saved, cfg, overrides, groups=("model", "dataset", "tome"))
    keys = override_keys(overrides)
    if any(overridable(key, ["model"]) for key in keys):
        check_same_architecture(saved.model, effective.model, cfg.ckpt)
    if any(overridable(key, ["dataset"]) for key in keys):
        check_same_classes(saved, effective, cfg.ckpt)
    rebuilt = cfg.copy()
    with open_dict(rebuilt):  # the saved groups replace the composed ones whole
        rebuilt.model, rebuilt.dataset, rebuilt.tome = effective.model, effective.dataset, effective.tome
    return rebuilt, run


def label_order(dataset_cfg: DictConfig, saved: Optional[SavedRun]) -> Optional[list[str]]:
    """The class names in the order of the model's head: a checkpoint's own where it saved them (a class
    folder's val/ is mapped onto them by name, one they lack refused by name), else the data set's."""
    if saved is not None and saved.classes:
        return list(saved.classes)
    return class_names(dataset_cfg)


def check_same_classes(saved: DictConfig, effective: DictConfig, path: Any) -> None:
    """A checkpoint's head has one output per class of the data set it was trained on: refuse another count."""
    trained = saved.dataset.get("num_classes")
    try:
        wanted = count_classes(effective.dataset)
    except DatasetError:
        return  # a folder without train/: its classes are mapped onto the checkpoint's by name
    if trained and int(trained) != wanted:
        raise UserError(
            f"checkpoint {path} has {trained} classes, the data set ({effective.dataset.name}) {wanted}; "
            f"evaluate it on a data set with its {trained} classes (drop the dataset override)"
        )
