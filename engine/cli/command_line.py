"""The command line, checked before Hydra starts or any folder is made: each override against the schema and
Hydra's config groups, then every job's config composed and validated. Each problem is one line (`UserError`): an
unknown key names the nearest keys, a renamed key its new name, a bad value what the key takes. What passes goes to
Hydra unchanged, except that a new key under `model.kwargs` is spelled `++`, and a `tome.flops` given adds
`tome.r=null`, a `tome.r` given `tome.flops=null`."""

from __future__ import annotations

import copy
import difflib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser  # the parser of Hydra's own flags, as @hydra.main reads them
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from ..run.compat import RENAMED
from ..schema import FIELDS, KEYS, check_value, register, validate

GROUP_HINTS = {
    "dataset": "; for your own images use dataset=imagefolder dataset.root=DIR",
    "model": "; or keep a preset and set model.name=<any timm ViT>",
}


@dataclass
class Checked:
    """A command line that passed: what Hydra gets, and the config it composes to (first sweep values)."""

    argv: list[str]
    cfg: DictConfig
    multirun: bool
    runs: bool  # False for --cfg/--help/--info: Hydra prints and nothing runs


def check_command_line(argv: list[str], configs: Path) -> Checked:
    """Everything Hydra would find only later (or report in many lines), as one UserError."""
    parser = get_args_parser()
    parser.error = _refuse_flags  # type: ignore[method-assign]
    args = parser.parse_intermixed_args(argv)  # flags anywhere: `task=eval -m tome.r=0,8`
    if sum(map(bool, (args.run, args.multirun, args.cfg, args.info, args.shell_completion))) > 1:
        raise UserError("only one of --run, --multirun, --cfg, --info and --shell-completion: drop the others")
    if args.shell_completion:  # its words (install=bash) are Hydra's, not overrides
        return Checked(argv=list(argv), cfg=OmegaConf.create(), multirun=False, runs=False)
    flags = list(argv)
    for override in args.overrides:
        flags.remove(override)
    register()
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()  # it knows the config groups
        overrides = _parse(args.overrides, loader)
        swept = next((o for o in overrides if o.is_sweep_override()), None)
        if swept is not None and not args.multirun:
            raise UserError(f"{swept.input_line} is a sweep: add -m (--multirun) to run one job per value")
        hydra_args = [_checked(override, loader) for override in overrides]
        hydra_args += _r_or_flops({o.key_or_group: o for o in overrides if not o.is_delete()})
        parsed = _parse(hydra_args, loader)
        jobs = [list(job) for job in itertools.product(*map(_values, parsed))]  # one without a sweep (and -m)
        cfg = _validate_jobs(jobs, parsed, loader)  # each job of a sweep, before the first starts
    runs = not (args.help or args.hydra_help or args.cfg or args.info)
    return Checked(argv=flags + hydra_args, cfg=cfg, multirun=args.multirun, runs=runs)


def _refuse_flags(message: str) -> None:
    raise UserError(f"cannot read the command line ({message}); see python main.py --help")


def _parse(args: list[str], loader: Any) -> list[Any]:
    try:  # with the loader: a glob() sweep lists a group's options
        return OverridesParser.create(config_loader=loader).parse_overrides(args)
    except HydraException as err:
        raise UserError(f"cannot read the command line ({' '.join(str(err).split())})") from err


def _compose(overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except HydraException as err:
        raise UserError(f"cannot compose the config ({' '.join(str(err).split())})") from err


def _group_options(loader: Any, key: str) -> list[str]:
    """The options of config group `key` (empty for a key that is not a group)."""
    return [name for name in loader.get_group_options(key) if not name.startswith("_")]


def _checked(override: Any, loader: Any) -> str:
    """The override as Hydra gets it, or a UserError (every value of a sweep is checked)."""
    key = override.key_or_group
    values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    if key in RENAMED:
        raise UserError(f"{key} is now {RENAMED[key]}: write {RENAMED[key]}={override.input_line.split('=', 1)[1]}")
    options = _group_options(loader, key)
    for value in values if options else []:
        if value is not None and str(value) not in options:
            hint = GROUP_HINTS.get(key, "")
            raise UserError(f"unknown {key} {value!r}; choose one of {', '.join(sorted(options))}{hint}")
    if options or override.is_delete() or key.startswith("hydra"):
        return str(override.input_line)
    if key.startswith("model.kwargs."):  # any create_model / from_pretrained argument: add or replace, '+' or not
        return "++" + override.input_line.lstrip("+")
    if override.is_add() or override.is_force_add():
        exists = f"; {key} exists: write {key}=..." if key in FIELDS else _nearest(key)
        raise UserError(f"+{key}: only model.kwargs takes new keys{exists}")
    if key not in FIELDS and not _below_a_mapping(key):
        raise UserError(f"{key} is not a key{_nearest(key)}")
    for value in values:
        if problem := check_value(key, value):
            raise UserError(problem)
    return str(override.input_line)


def _below_a_mapping(key: str) -> bool:
    """A key inside a schema mapping (model.architecture.hidden_size): the preset's own keys, judged by Hydra."""
    return any(key.startswith(f"{name}.") for name, found in FIELDS.items() if "Dict" in str(found.type))


def _nearest(key: str, keys: Optional[list[str]] = None) -> str:
    candidates = difflib.get_close_matches(key, keys or KEYS, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(candidates)}?" if candidates else "; see README.md or python main.py --cfg job"


def _r_or_flops(given: dict[str, Any]) -> list[str]:
    """tome.r or tome.flops, never both: the one given replaces the other's default (or a checkpoint's)."""
    flops = given.get("tome.flops")
    budget = flops is not None and str(flops.value()) != "None"
    if budget and "tome.r" in given:
        raise UserError("tome.r and tome.flops both given: tome.flops chooses r from a FLOP budget; drop one of them")
    if budget:
        return ["tome.r=null"]
    return ["tome.flops=null"] if "tome.r" in given and flops is None else []


def _validate_jobs(jobs: list[list[tuple[str, Any]]], overrides: list[Any], loader: Any) -> DictConfig:
    """Validate each job's config; returns the first's. Composed once per choice of config groups: a later job with
    the same choice sets its other keys on a copy (as Hydra sets an override on the composed config)."""
    # Whether each override chooses a config group's option (`model=...`, `hydra/launcher=...`) or sets a key.
    groups = [bool(_group_options(loader, o.key_or_group)) or o.key_or_group.startswith("hydra") for o in overrides]
    inside = [o.key_or_group for o in overrides if _below_a_mapping(o.key_or_group) and not o.is_force_add()]
    composed: dict[tuple[str, ...], DictConfig] = {}
    for job in jobs:
        chosen = tuple(line for (line, _), group in zip(job, groups) if group)
        if chosen not in composed:
            if inside:  # each must be one of its mapping's keys in the groups this job chooses, composed alone
                base = _compose(list(chosen))
                for key in inside:
                    parent = key.rpartition(".")[0]
                    node = OmegaConf.select(base, parent)
                    if not isinstance(node, DictConfig):
                        raise UserError(
                            f"{key} is not a key: {parent} is null in this preset (transformers presets set it)"
                        )
                    if OmegaConf.select(node, key[len(parent) + 1 :], default="absent") == "absent":
                        raise UserError(f"{key} is not a key{_nearest(key, [f'{parent}.{k}' for k in node])}")
            cfg = composed[chosen] = _compose([line for line, _ in job])
        else:
            cfg = copy.deepcopy(composed[chosen])
            for (_, value), override, group in zip(job, overrides, groups):
                if not group and not override.is_delete():
                    OmegaConf.update(cfg, override.key_or_group, value, merge=True, force_add=override.is_force_add())
        validate(cfg)
    return next(iter(composed.values()))  # the first job's


def _values(override: Any) -> list[tuple[str, Any]]:
    """(the override as one job gets it, its value) for each value of a sweep."""
    prefix = {"ADD": "+", "FORCE_ADD": "++"}.get(override.type.name, "")
    if override.is_delete() or not override.is_sweep_override():  # a delete (one job, swept or not): value unread
        return [(override.input_line, override.value())]
    lines = [f"{prefix}{override.key_or_group}={value}" for value in override.sweep_string_iterator()]
    if not lines:
        raise UserError(f"{override.input_line} sweeps no value: give at least one")
    return list(zip(lines, override.sweep_iterator()))
