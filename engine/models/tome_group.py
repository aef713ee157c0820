"""How much the `tome` group merges, one rule for the command-line checks and the model builder: an r
(`regtome.r_from_config`) or a FLOP budget (tome.flops), never both. Importing this module loads no torch."""

from __future__ import annotations

from typing import Any, Mapping, Optional

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


def merge_amount(tome: Mapping[str, Any]) -> tuple[Any, Optional[float]]:
    """(r, None) when tome.r says how much to merge, (None, fraction) when tome.flops does; a UserError when both
    or neither are set (the command line clears the other key of the one it is given)."""
    r, flops = tome.get("r"), tome.get("flops")
    if flops is not None and not (isinstance(flops, (int, float)) and 0 < flops <= 1):
        raise UserError(f"tome.flops={flops}: a fraction of the unmerged model's GFLOPs in (0, 1], e.g. tome.flops=0.5")
    if flops is not None and r is not None:
        raise UserError(
            f"tome.r={compact(r)} and tome.flops={flops} are both set (in a config file); "
            "tome.flops chooses r from a FLOP budget: set tome.r=null, or drop tome.flops"
        )
    if flops is None and r is None:
        raise UserError("tome.r is null: set tome.r=INT (or tome.flops=FRACTION to choose r from a FLOP budget)")
    return r, None if flops is None else float(flops)
