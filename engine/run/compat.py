"""Config compatibility, in one place: keys that moved (`RENAMED`, refused on the command line with their
new name) and configs saved by earlier releases, read in today's names (`saved_config`)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Old keys and where they live now (also applied to configs saved in older checkpoints).
RENAMED = {
    "trainer.device": "runtime.device",
    "trainer.amp": "runtime.amp",
    "trainer.num_workers": "runtime.num_workers",
    "trainer.eval_batch_size": "runtime.eval_batch_size",
    "model.class_layer": "tome.class_layer",
    "model.register_layer": "tome.register_layer",
    "resume": "trainer.resume",
    "overwrite": "trainer.overwrite",
    "dataset.img_size": "dataset.native_size",
}
UNRECORDED_PROTECT = "prefix"  # what every release before the protect option ran with


def saved_config(checkpoint: Mapping[str, Any], path: Any) -> DictConfig:
    """A checkpoint's config, saved by any release, in today's key names (`RENAMED`; keys already in their new
    place are kept). A tome group without `protect` keeps the mode it ran with, and a line says so."""
    config = OmegaConf.to_container(OmegaConf.create(dict(checkpoint["config"])), resolve=False)
    if isinstance(config.get("tome"), dict) and "protect" not in config["tome"]:  # before RENAMED may add a group
        log.info(
            f"checkpoint {path} records no tome.protect: it keeps protect={UNRECORDED_PROTECT}, the mode it was "
            "trained with (set tome.protect=... to evaluate it under another)"
        )
    for old, new in RENAMED.items():
        old_parent, _, old_key = old.rpartition(".")
        source = config.get(old_parent) if old_parent else config
        if not isinstance(source, dict) or old_key not in source:
            continue
        value = source.pop(old_key)
        new_parent, _, new_key = new.rpartition(".")
        target = config.setdefault(new_parent, {}) if new_parent else config
        target.setdefault(new_key, value)
    if config.get("task") == "train" and config.get("ckpt"):  # training used to read ckpt as its start weights
        config.setdefault("trainer", {}).setdefault("init_from", config["ckpt"])
        config["ckpt"] = None
    if isinstance(config.get("tome"), dict):
        config["tome"].setdefault("protect", UNRECORDED_PROTECT)
    return OmegaConf.create(config)
