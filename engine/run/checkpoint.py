"""Checkpoints written atomically, the one reader every task and script uses (`read_checkpoint`: safe loads, clear
errors on the wrong file), and a run rebuilt from a checkpoint's saved config, keeping what the command line sets."""

from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from data import DatasetError, class_names, count_classes

from ..errors import CheckpointHoldsCode, CorruptCheckpoint, UserError
from .compat import saved_config
from .folder_claim import atomic_write


def atomic_save(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """torch.save through `atomic_write`. torch's zip writer meets a full disk (ENOSPC) in its write, then fails
    its own check ('unexpected pos') on the way out, which hides the reason: the OSError behind it is raised."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except RuntimeError as err:
        cause = err.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from err


@dataclass(frozen=True)
class SavedRun:
    """What a checkpoint holds about the run that wrote it, read once (`read_checkpoint`)."""

    path: Path
    config: DictConfig  # the run's config, in today's key names
    weights: dict[str, torch.Tensor]  # the weights to use: the EMA's when the run kept an EMA, else the model's
    classes: Optional[list[str]]  # the label order of its head (None: an older checkpoint did not save it)
    state: dict[str, Any]  # where its training stood: epochs done, step in the epoch, best top-1, history
    checkpoint: dict[str, Any]  # all of it, for a resume (optimizer, schedule, scaler, RNG states)

    @property
    def trained_with(self) -> dict[str, Any]:
        """What it was trained with, for the record of a run that uses it: epochs, data set, merging."""
        return {
            "epochs": self.state.get("epoch"),
            "dataset": self.config.dataset.get("name"),
            "tome": OmegaConf.to_container(self.config.tome, resolve=True) if "tome" in self.config else None,
        }


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> SavedRun:
    """The one reader of a RegToMe checkpoint: its config, weights (one rule: EMA when kept), class names and
    training state. mmap=True maps the tensors instead of reading them (for its config or state alone)."""
    checkpoint = load_checkpoint(path, mmap=mmap)
    ema = checkpoint.get("ema")
    return SavedRun(
        path=Path(path),
        config=saved_config(checkpoint, path),
        weights=ema if ema is not None else checkpoint["model"],
        classes=checkpoint.get("classes"),
        state=dict(checkpoint.get("state") or {}),
        checkpoint=checkpoint,
    )


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Load a RegToMe checkpoint with weights_only=True: a checkpoint can never run code. The only torch.load
    of a checkpoint; `read_checkpoint` is what tasks call."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass ckpt=PATH to a checkpoints/last.pt or best.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch.load raises many types for a damaged file
        unsafe: list[str] = []  # pickled callables (classes, functions): exactly what may run code
        with suppress(Exception):  # not a torch zip file at all: corrupt, not code
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if unsafe:
            raise CheckpointHoldsCode(
                f"checkpoint {path} holds Python objects that weights_only loading refuses (they could run code); "
                "re-save it with tensors and plain types only"
            ) from err
        with open(path, "rb") as f:  # torch.save writes a zip archive: a file that does not start as one never was
            if f.read(4) != b"PK\x03\x04":  # a text file, an image, random bytes: torch's reason says nothing
                raise CorruptCheckpoint(
                    f"{path} is not a checkpoint (torch.save writes a zip archive, this file is not one); "
                    "pass ckpt=PATH to a run's checkpoints/last.pt or best.pt"
                ) from err
        raise CorruptCheckpoint(
            f"checkpoint {path} is truncated or corrupt ({_reason(err)}); use another checkpoint"
        ) from err
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise UserError(
            f"{path} is not a RegToMe checkpoint (no 'model' and 'config'); for raw timm weights "
            "use model.pretrained_file=PATH"
        )
    return checkpoint


def _reason(err: Exception) -> str:
    """The first sentence, whole, of the informative line of a torch.load error (torch wraps it in paragraphs
    of general advice); a type name where that sentence is too long to quote on one line."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(boilerplate)]
    first = (specific or lines or [""])[0]
    sentence = first.split(". ", 1)[0].rstrip(".")
    return sentence if 0 < len(sentence) <= 240 else type(err).__name__


def check_same_architecture(saved: Mapping[str, Any], wanted: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Name every architecture setting where a checkpoint's model config differs from the wanted one."""
    diffs = [
        f"model.{k}: checkpoint {saved.get(k)!r}, config {wanted.get(k)!r}"
        for k in ("name", "registers", "kwargs")
        if saved.get(k) != wanted.get(k)
    ]
    if diffs:
        raise UserError(
            f"checkpoint {path} is another architecture ({'; '.join(diffs)}); "
            "drop the model overrides or use a matching checkpoint"
        )


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """load_state_dict(strict) with a one-line error naming the mismatching tensors."""
    own = model.state_dict()
    mismatches = {
        "missing": sorted(set(own) - set(state_dict)),
        "unexpected": sorted(set(state_dict) - set(own)),
        "shape": [
            f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
            for k in own
            if k in state_dict and own[k].shape != state_dict[k].shape
        ],
    }
    found = [f"{what} {names[:3]}" for what, names in mismatches.items() if names]
    if found:
        raise UserError(
            f"checkpoint {path} does not fit the model ({'; '.join(found)}); check model.name and model.registers"
        )
    model.load_state_dict(state_dict)


def override_keys(overrides: Iterable[str]) -> list[str]:
    """'tome.r=16' -> 'tome.r'; '+x=1' -> 'x'; 'dataset=cifar100' -> 'dataset'."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def overrides_in(overrides: Sequence[str], groups: Sequence[str]) -> list[str]:
    """The overrides that set a key of one of `groups` ('trainer' takes 'trainer.lr=...'), or one named in it
    whole ('dataset.skip_unreadable=true')."""
    return [o for o, key in zip(overrides, override_keys(overrides)) if key.split(".", 1)[0] in groups or key in groups]


def apply_overrides(
    saved: DictConfig, current: DictConfig, overrides: Sequence[str], groups: Sequence[str]
) -> DictConfig:
    """`saved`, with the keys the command line set taken from `current` where they are `overrides_in` `groups`;
    a group switch (dataset=cifar100) replaces the whole group."""
    result = saved.copy()
    for key in override_keys(overrides_in(overrides, groups)):
        OmegaConf.update(result, key, OmegaConf.select(current, key), merge=False, force_add=True)
    return result


def config_from_checkpoint(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Optional[SavedRun]]:
    """With ckpt=PATH: take model, dataset and tome from the checkpoint's saved config (keys set on
    this command line win); return it and the checkpoint as `read_checkpoint` reads it (None without ckpt=)."""
    if not cfg.ckpt:
        return cfg, None
    run = read_checkpoint(cfg.ckpt)
    effective = apply_overrides(run.config, cfg, overrides, groups=("model", "dataset", "tome"))
    if overrides_in(overrides, ["model"]):
        check_same_architecture(run.config.model, effective.model, cfg.ckpt)
    if overrides_in(overrides, ["dataset"]):  # the head has one output per class of the data set it was trained on
        trained = run.config.dataset.get("num_classes")
        with suppress(DatasetError):  # a folder without train/: its classes are mapped onto the checkpoint's by name
            wanted = count_classes(effective.dataset)
            if trained and int(trained) != wanted:
                raise UserError(
                    f"checkpoint {cfg.ckpt} has {trained} classes, the data set ({effective.dataset.name}) {wanted}; "
                    f"evaluate it on a data set with its {trained} classes (drop the dataset override)"
                )
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
