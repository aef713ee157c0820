"""How many tokens each block merges: the r schedule, and r from a config file (the per-block cap is the
matching's: `regtome.merge.capped_r`).

In Python an r is an int (same r in every block), a tuple ``(r, inflection)`` as in ToMe, or a
list with one int per block. Config files (YAML, JSON, Hydra) have no tuples: `r_from_config`
is the one place that reads them, and it refuses a value that could mean two things.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from .merge import capped_r  # noqa: F401  (its old import path; the cap belongs to the matching)

RSchedule = Union[int, tuple, Sequence[int]]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pair_schedule(num_blocks: int, r: tuple) -> list[int]:
    if len(r) != 2:
        raise ValueError(f"an r pair must be (r, inflection), got {r!r}")
    base, inflection = r
    if not _is_int(base) or base < 0:
        raise ValueError(f"the r of an (r, inflection) pair must be an int >= 0, got {base!r}")
    if not isinstance(inflection, (int, float)) or isinstance(inflection, bool) or not -1 <= inflection <= 1:
        raise ValueError(f"the inflection of an (r, inflection) pair must be a number in [-1, 1], got {inflection!r}")
    first = int(base * (1.0 - inflection))
    last = 2 * base - first
    step = (last - first) / (num_blocks - 1) if num_blocks > 1 else 0.0
    return [int(first + step * i) for i in range(num_blocks)]


def parse_r(num_blocks: int, r: RSchedule) -> list[int]:
    """Return how many tokens to merge in each of `num_blocks` blocks.

    - ``16``: 16 in every block.
    - ``(16, -1.0)``: ToMe's schedule (a tuple); the inflection in [-1, 1] tilts the schedule,
      keeping the total at ``r * num_blocks`` (-1 merges most early, +1 most late).
    - ``[8, 8, 4]``: one int per block; a shorter list is padded with 0.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if isinstance(r, int) and not isinstance(r, bool):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        return [r] * num_blocks
    if isinstance(r, tuple):
        return _pair_schedule(num_blocks, r)
    if isinstance(r, Sequence) and not isinstance(r, str):
        values = list(r)
        if not all(_is_int(v) and v >= 0 for v in values):
            hint = ""
            if len(values) == 2 and isinstance(values[1], (int, float)) and -1 <= values[1] <= 1:
                hint = f"; for ToMe's (r, inflection) schedule pass a tuple: ({values[0]}, {float(values[1])})"
            raise ValueError(f"a per-block r list must hold ints >= 0, got {values!r}{hint}")
        if len(values) > num_blocks:
            raise ValueError(f"the r list has {len(values)} entries but the model has only {num_blocks} blocks")
        return values + [0] * (num_blocks - len(values))
    raise ValueError(
        f"r must be an int, a tuple (r, inflection) or a list of ints per block, got {type(r).__name__} {r!r}"
    )


def r_from_config(value: Any) -> RSchedule:
    """An r written in a config file (no tuples there), as `parse_r` takes it.

    The rule: an int is an int; a two-item list whose second item is a float (``[16, -1.0]``) is
    the pair ``(16, -1.0)``; any other list is one int per block. ``[16, -1]``, ``[16, 0]`` and
    ``[16, 1]`` could mean either, so they are refused with the spelling of both meanings.
    Raises ValueError for anything else (negative values included).
    """
    if isinstance(value, (list, tuple)):
        items = list(value)
        if len(items) == 2 and isinstance(items[1], float) and not isinstance(items[0], float):
            pair = (items[0], items[1])
            _pair_schedule(2, pair)  # validates r and the inflection
            return pair
        if len(items) == 2 and _is_int(items[0]) and _is_int(items[1]) and items[1] == -1:
            raise ValueError(
                f"[{items[0]},-1] is not a schedule: a per-block list holds ints >= 0; for ToMe's "
                f"(r, inflection) schedule write [{items[0]},-1.0]"
            )
        if len(items) == 2 and _is_int(items[0]) and _is_int(items[1]) and items[1] in (0, 1):
            raise ValueError(
                f"[{items[0]},{items[1]}] is ambiguous: write [{items[0]},{float(items[1])}] for ToMe's "
                f"(r, inflection) schedule, or [{items[0]},{items[1]},0] for one int per block"
            )
        bad = [v for v in items if not (_is_int(v) and v >= 0)]
        if bad:
            raise ValueError(
                f"{items} is not a schedule: a per-block list holds ints >= 0 (got {bad[0]!r}); "
                "a pair is [r, inflection] with a float inflection such as [16,-1.0]"
            )
        return items
    if _is_int(value):
        if value < 0:
            raise ValueError(f"r must be >= 0, got {value}; for ToMe's schedule write [r,inflection] such as [16,-1.0]")
        return value
    raise ValueError(f"r must be an int, [r, inflection] or a list of ints per block, got {value!r}")
