"""Fair timing: every case runs in the same process, interleaved, after warm-up, synchronised."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ..run.runtime import synchronize


def interleaved_seconds(
    cases: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int = 2,
    repeats: int = 5,
    iters: int = 3,
    progress: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each case.

    Each repeat runs every case in turn (so slow drifts of clock speed or load hit all cases
    alike); the median over repeats drops outliers.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / iters)
            if progress is not None:
                progress()
    return {name: statistics.median(values) for name, values in samples.items()}
