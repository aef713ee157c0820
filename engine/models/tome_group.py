"""How much the `tome` group asks to merge, in one place: an r (regtome's rule, `regtome.r_from_config`) or a
FLOP budget (tome.flops, r chosen from it when the model is built), never both. The command-line checks
and the model builder both read these functions; importing this module loads no torch."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from omegaconf import ListConfig

from ..errors import UserError


def compact(value: Any) -> str:
    """An r schedule as one word for a message or a log line: (16, -1.0) -> '(16,-1.0)'."""
    return str(value).replace(" ", "")


def r_option(value: Any, name: Optional[str] = None) -> Any:
    """An r from the config as regtome takes it; a UserError that starts with `name` (default 'tome.r=VALUE')."""
    import regtome  # torch: only when an r is read

    try:
        return regtome.r_from_config(value)
    except ValueError as err:
        raise UserError(f"{name or f'tome.r={compact(value)}'}: {err}") from err


def check_flops(value: Any) -> None:
    """tome.flops is null or a fraction of the unmerged model's GFLOPs in (0, 1]."""
    if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise UserError(f"tome.flops={value}: a fraction of the unmerged model's GFLOPs in (0, 1], e.g. tome.flops=0.5")


def merge_amount(tome: Mapping[str, Any]) -> tuple[Any, Optional[float]]:
    """(r, None) when tome.r says how much to merge, (None, fraction) when tome.flops does; a UserError when
    both or neither are set. (The command line spells this for its own keys: a tome.flops given sets tome.r=null,
    a tome.r given sets tome.flops=null, both given is refused before this is read.)"""
    r, flops = tome.get("r"), tome.get("flops")
    check_flops(flops)
    if flops is not None and r is not None:
        raise UserError(
            f"tome.r={compact(r)} and tome.flops={flops} are both set (in a config file); "
            "tome.flops chooses r from a FLOP budget: set tome.r=null, or drop tome.flops"
        )
    if flops is None and r is None:
        raise UserError("tome.r is null: set tome.r=INT (or tome.flops=FRACTION to choose r from a FLOP budget)")
    return r, None if flops is None else float(flops)


def protect_modes(value: Any, key: str = "benchmark.protect") -> list[str]:
    """A protection mode or a list of them (benchmark.protect) as a list, each one checked."""
    import regtome  # torch: only when modes are read

    modes = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    bad = [mode for mode in modes if mode not in regtome.PROTECT_MODES]
    if bad:
        raise UserError(f"{key}={bad[0]}: choose modes among {', '.join(regtome.PROTECT_MODES)}")
    return modes
