"""What main.py does around Hydra: check the command line first, name run folders, report errors.

Nothing here runs at import; main.py calls these functions.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from .errors import one_line

HINTS = {"dataset": "; for your own images use dataset=imagefolder dataset.root=DIR",
         "model": "; or keep a preset and set model.name=<any timm ViT>"}
R_KEYS = ("tome.r", "benchmark.r")


def check_command_line(argv: list[str], configs: Path, tasks: tuple[str, ...]) -> Optional[str]:
    """The first problem Hydra would find only later (or report in many lines), or None.

    Every value of a sweep is checked, so `tome.r=4,-1,8` fails before its first job runs.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException as err:
        return f"cannot read the command line ({one_line(err)})"
    given = {o.key_or_group: o for o in overrides if not o.is_delete()}
    if "tome.r" in given and "tome.flops" in given and str(given["tome.flops"].value()) != "None":
        return "tome.r and tome.flops both given: tome.flops chooses r from a FLOP budget; drop one of them"
    for override in overrides:
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra"):
            continue
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        problem = _check_values(key, values, configs, tasks)
        if problem:
            return problem
    return None


def _check_values(key: str, values: list[Any], configs: Path, tasks: tuple[str, ...]) -> Optional[str]:
    import regtome

    folder = configs / key
    for value in values:
        if key == "task" and value not in tasks:
            return f"unknown task {value!r}; use task={', '.join(tasks)}"
        if folder.is_dir() and value is not None:
            options = sorted(p.stem for p in folder.glob("*.yaml"))
            if str(value) not in options:
                return f"unknown {key} {value!r}; choose one of {', '.join(options)}{HINTS.get(key, '')}"
        if key == "tome.r":
            try:
                regtome.r_from_config(value)
            except ValueError as err:
                return f"{key}={str(value).replace(' ', '')}: {err}"
        if key == "tome.flops" and value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
            return f"tome.flops={value}: a fraction of the unmerged model's GFLOPs in (0, 1], e.g. tome.flops=0.5"
        if key == "benchmark.r":
            for r in value if isinstance(value, list) else [value]:
                try:
                    regtome.r_from_config(r)
                except ValueError as err:
                    return f"{key} entry {str(r).replace(' ', '')}: {err}"
    return None


def register_resolvers() -> None:
    """${run_id:} and ${run_name:} for hydra.run.dir and hydra.sweep.dir (Hydra carries them into SLURM jobs)."""
    from .run_dir import run_id

    OmegaConf.register_new_resolver("run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)


def run_name(_root_: DictConfig) -> str:
    """'<dataset>_<model label>' of what the run builds: with ckpt=PATH, the checkpoint's data set and model."""
    from .model import model_label

    dataset, model = _root_.dataset, _root_.model
    saved = _saved_config(str(_root_.ckpt)) if _root_.get("ckpt") else None
    if saved is not None:
        dataset, model = saved.get("dataset", dataset), saved.get("model", model)
    try:
        return f"{dataset['name']}_{model_label(model)}"
    except Exception:  # an incomplete model group: the task reports it; the folder keeps the plain name
        return f"{dataset['name']}_{model['name']}"


@functools.lru_cache(maxsize=4)
def _saved_config(path: str) -> Optional[dict[str, Any]]:
    """The config inside a checkpoint (memory-mapped: its tensors are not read), or None."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return checkpoint["config"]
    except Exception:  # a bad checkpoint is reported by the task itself
        return None


def report_error(err: BaseException) -> None:
    print(f"error: {one_line(err)}", file=sys.stderr)


HYDRA_FILES = {".hydra", "main.log"}


def discard_empty_run_dir(run_dir: Path) -> None:
    """Remove a run folder that holds only what Hydra wrote for this failed command, and its empty parents."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= HYDRA_FILES:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != parent.parent and parent.name not in ("outputs", "multirun", "") and _is_empty(parent):
        parent.rmdir()
        parent = parent.parent
    if parent.name in ("outputs", "multirun") and _is_empty(parent):
        parent.rmdir()


def _is_empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:
        return False
