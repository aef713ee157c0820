"""Choose r from a FLOP budget: the schedule whose analytic GFLOPs come closest to a fraction of the unmerged
model's."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .flops import grid_tokens, simulate_tokens, token_flops
from .parts import model_parts
from .schedule import RSchedule

# The schedules searched: ToMe's (r, inflection) family. Inflection 0 is a constant r in every block,
# the simplest schedule and the default; -0.5 and -1 merge more in early blocks, which reaches low
# budgets that a constant r cannot (the cap stops a constant r once few tokens are left).
INFLECTIONS = (0.0, -0.5, -1.0)


def schedule_gflops(model: nn.Module, r: RSchedule, input_size: tuple[int, int, int]) -> float:
    """Analytic GFLOPs at schedule r (equal to `regtome.vit_flops` with model.r = r, without a forward pass)."""
    return token_flops(model, *simulate_tokens(model, r, input_size), input_size)


def r_for_flops(model: nn.Module, fraction: float, input_size: Optional[tuple[int, int, int]] = None) -> RSchedule:
    """An r for `model.r` whose GFLOPs are at most `fraction` of the unmerged model's, as close to it as possible.

    Searched: for each inflection in INFLECTIONS, the smallest r whose GFLOPs fit the budget
    (FLOPs fall as r grows, so a bisection finds it); of those, the schedule closest to the budget
    wins, a constant r on ties. Returns an int for a constant r, else an ``(r, inflection)`` pair.
    Raises ValueError when the fraction is outside (0, 1] or below what merging can reach.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"the FLOP fraction must be in (0, 1], got {fraction}")
    if input_size is None:
        input_size = model_parts(model).input_size
    budget = fraction * schedule_gflops(model, 0, input_size)
    largest = grid_tokens(model, input_size)  # no block can merge more tokens than there are patches
    best: Optional[tuple[float, RSchedule]] = None
    for inflection in INFLECTIONS:

        def schedule(r: int, inflection: float = inflection) -> RSchedule:
            return r if inflection == 0 else (r, inflection)

        if schedule_gflops(model, schedule(largest), input_size) > budget:
            continue  # this family cannot reach the budget
        low, high = 0, largest  # invariant: schedule(high) fits, schedule(low - 1) does not
        while low < high:
            middle = (low + high) // 2
            if schedule_gflops(model, schedule(middle), input_size) <= budget:
                high = middle
            else:
                low = middle + 1
        gap = budget - schedule_gflops(model, schedule(high), input_size)
        if best is None or gap < best[0] - 1e-12:
            best = (gap, schedule(high))
    if best is None:
        lowest = min(schedule_gflops(model, largest if i == 0 else (largest, i), input_size) for i in INFLECTIONS)
        raise ValueError(
            f"a FLOP fraction of {fraction} is below what merging reaches on this model "
            f"({lowest / schedule_gflops(model, 0, input_size):.2f} at most merging)"
        )
    return best[1]
