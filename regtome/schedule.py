"""How many tokens each block merges: the r schedule and the per-block cap."""
from __future__ import annotations

from typing import Sequence, Union

# An r is an int (same r in every block), a pair (r, inflection) as in ToMe, or one int per block.
RSchedule = Union[int, tuple, Sequence[int]]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pair(r: object) -> bool:
    """A pair is a tuple of two, or a two-item list whose second item is a float (Hydra has no tuples)."""
    if isinstance(r, tuple):
        return True
    return isinstance(r, (list, Sequence)) and not isinstance(r, str) and len(r) == 2 and isinstance(r[1], float)


def parse_r(num_blocks: int, r: RSchedule) -> list[int]:
    """Return how many tokens to merge in each of `num_blocks` blocks.

    - ``16``: 16 in every block.
    - ``(16, -1.0)`` (or ``[16, -1.0]``): ToMe's schedule; the inflection in [-1, 1] tilts the
      schedule, keeping the total at ``r * num_blocks`` (-1 merges most early, +1 most late).
    - ``[8, 8, 4]``: one int per block; a shorter list is padded with 0.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if _is_int(r):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        return [r] * num_blocks
    if _is_pair(r):
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
    if isinstance(r, Sequence) and not isinstance(r, str):
        values = list(r)
        if not all(_is_int(v) and v >= 0 for v in values):
            raise ValueError(f"a per-block r list must hold ints >= 0, got {values!r}")
        if len(values) > num_blocks:
            raise ValueError(f"the r list has {len(values)} entries but the model has only {num_blocks} blocks")
        return values + [0] * (num_blocks - len(values))
    raise ValueError(
        f"r must be an int, a pair (r, inflection) or a list of ints per block, got {type(r).__name__} {r!r}"
    )


def capped_r(r: int, num_tokens: int, num_protected: int) -> int:
    """At most half of the mergeable tokens can merge in one block (set A has ceil(n/2) of them)."""
    return max(0, min(r, (num_tokens - num_protected) // 2))
