"""Rebuild a run from a checkpoint's saved config, keeping what this command line says explicitly."""
from __future__ import annotations

from typing import Iterable

from omegaconf import DictConfig, OmegaConf


def override_keys(overrides: Iterable[str]) -> list[str]:
    """'tome.r=16' -> 'tome.r'; '+x=1' -> 'x'; 'dataset=cifar100' -> 'dataset'."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def apply_overrides(saved: DictConfig, current: DictConfig, overrides: Iterable[str],
                    groups: Iterable[str]) -> DictConfig:
    """`saved`, with the keys of `groups` that the command line set taken from `current`."""
    result = saved.copy()
    groups = tuple(groups)
    for key in override_keys(overrides):
        group = key.split(".", 1)[0]
        if group not in groups:
            continue
        if key == group:  # a group switch (dataset=cifar100) replaces the whole group
            OmegaConf.update(result, group, OmegaConf.select(current, group), merge=False, force_add=True)
        else:
            OmegaConf.update(result, key, OmegaConf.select(current, key), merge=False, force_add=True)
    return result


def overrides_group(overrides: Iterable[str], group: str) -> bool:
    return any(k.split(".", 1)[0] == group for k in override_keys(overrides))
