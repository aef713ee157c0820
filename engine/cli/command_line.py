"""The command line, checked against the composed config before Hydra starts or any folder is made.

Each problem is one line (`UserError`): an unknown key names the nearest valid keys, a renamed key
its new name, a bad value what it must be; every value of a sweep is checked, so `tome.r=4,-1,8`
fails before its first job. What passes is handed to Hydra unchanged, except that a new key under
a free-form group (`model.kwargs.depth=4`) is spelled `++` for it, and that a `tome.flops` given adds
`tome.r=null` and a `tome.r` given adds `tome.flops=null` (`engine.models.tome_group`: one of them, never both).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from ..run.compat import RENAMED
from ..schema import register, validate

FREE_FORM = ("model.kwargs",)  # groups whose keys are any timm.create_model / from_pretrained argument
GROUP_HINTS = {
    "dataset": "; for your own images use dataset=imagefolder dataset.root=DIR",
    "model": "; or keep a preset and set model.name=<any timm ViT>",
}
NO_RUN_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve", "--shell-completion", "-sc"}
FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
}
INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's own flags (with their values: `--cfg job`, `--info defaults`) and the overrides."""
    flags, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and "=" not in arg:
            flags.append(arg)
            takes = arg in FLAGS_WITH_VALUE or (
                arg in ("--info", "-i") and i + 1 < len(argv) and argv[i + 1] in INFO_VALUES
            )
            if takes and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


@dataclass
class Checked:
    """A command line that passed: what Hydra gets, and the config it composes to (first sweep values)."""

    argv: list[str]
    cfg: DictConfig
    multirun: bool
    runs: bool  # False for --cfg/--help/--info: Hydra prints and nothing runs
    keys: list[str] = field(default_factory=list)


def _parse(args: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(args)
    except HydraException as err:
        raise UserError(f"cannot read the command line ({' '.join(str(err).split())})") from err


def _compose(configs: Path, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register()
    try:
        with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except HydraException as err:
        raise UserError(f"cannot compose the config ({' '.join(str(err).split())})") from err


def first_value(override: Any) -> str:
    """'key=value' with the first value of a sweep (what one job of it composes)."""
    prefix = {"ADD": "+", "FORCE_ADD": "++"}.get(override.type.name, "")
    if override.is_sweep_override():
        value = next(iter(override.sweep_string_iterator()))
    else:
        value = override.get_value_element_as_str()
    return f"{prefix}{override.key_or_group}={value}"


def _plain(cfg: Any) -> Any:
    """The config as plain dicts, interpolations and '???' values left as written (nothing is resolved)."""
    return OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg


def has_key(cfg: DictConfig, key: str) -> bool:
    node: Any = _plain(cfg)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    node = _plain(cfg)
    if not isinstance(node, dict):
        return [prefix]
    keys = []
    for name, value in node.items():
        if prefix == "" and name == "hydra":
            continue
        keys += leaf_keys(value, f"{prefix}.{name}" if prefix else str(name))
    return keys


def nearest(key: str, cfg: DictConfig) -> str:
    candidates = difflib.get_close_matches(key, leaf_keys(cfg), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(candidates)}?" if candidates else "; see README.md or python main.py --cfg job"


def check_keys(overrides: list[Any], configs: Path) -> tuple[DictConfig, list[str]]:
    """Refuse renamed and unknown keys; returns the composed config and the arguments for Hydra."""
    groups = {p.name for p in configs.iterdir() if p.is_dir()}
    for override in overrides:
        key = override.key_or_group
        if key in RENAMED:
            raise UserError(f"{key} is now {RENAMED[key]}: write {RENAMED[key]}={override.input_line.split('=', 1)[1]}")
    group_args = [first_value(o) for o in overrides if o.key_or_group in groups or o.key_or_group.startswith("hydra")]
    base = _compose(configs, group_args)
    hydra_args = []
    for override in overrides:
        key = override.key_or_group
        if key in groups or key.startswith("hydra") or override.is_delete():
            hydra_args.append(override.input_line)
            continue
        free = any(key.startswith(f"{parent}.") for parent in FREE_FORM)
        if (override.is_add() or override.is_force_add()) and not free:
            raise UserError(
                f"+{key}: only model.kwargs takes new keys"
                + (f"; {key} exists: write {key}=..." if has_key(base, key) else nearest(key, base))
            )
        if free:  # add or replace, with or without '+'
            hydra_args.append("++" + override.input_line.lstrip("+"))
            continue
        if not has_key(base, key):
            raise UserError(f"{key} is not a key{nearest(key, base)}")
        hydra_args.append(override.input_line)
    return base, hydra_args


def check_command_line(argv: list[str], configs: Path, check_values: Any) -> Checked:
    """Everything Hydra would find only later (or report in many lines), as one UserError.

    `check_values(key, values)` returns a problem with the values of one key, or None.
    """
    flags, args = split_flags(argv)
    overrides = _parse(args)
    for override in overrides:  # values first: a group choice that does not exist cannot be composed
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra"):
            continue
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        problem = check_values(key, values)
        if problem:
            raise UserError(problem)
    _, hydra_args = check_keys(overrides, configs)
    given = {o.key_or_group: o for o in overrides if not o.is_delete()}
    flops = given.get("tome.flops")
    if flops is not None and "tome.r" in given and str(flops.value()) != "None":
        raise UserError("tome.r and tome.flops both given: tome.flops chooses r from a FLOP budget; drop one of them")
    if flops is not None and "tome.r" not in given and str(flops.value()) != "None":
        hydra_args.append("tome.r=null")  # the budget replaces the default r
    if "tome.r" in given and flops is None:
        hydra_args.append("tome.flops=null")  # an r given replaces a budget (a checkpoint's saved tome.flops)
    composed_args = [first_value(o) if not o.is_delete() else o.input_line for o in _parse(hydra_args)]
    cfg = _compose(configs, composed_args)
    validate(cfg)
    multirun = bool({"-m", "--multirun"} & set(flags))
    runs = not (NO_RUN_FLAGS & set(flags))
    return Checked(
        argv=flags + hydra_args, cfg=cfg, multirun=multirun, runs=runs, keys=[o.key_or_group for o in overrides]
    )


def run_dir_of(cfg: DictConfig) -> Optional[Path]:
    """The folder a single (non-multirun) command will run in, resolved as Hydra will."""
    try:
        return Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
    except Exception:  # an interpolation that only Hydra's runtime resolves: let Hydra decide
        return None
