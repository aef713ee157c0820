"""Paired statistics for two classifiers on the same samples: bootstrap interval and exact McNemar test."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class PairedDelta:
    """Top-1 of `run` minus top-1 of `baseline`, in points, on the same samples."""

    delta_top1: float
    ci_low: float  # 95% paired bootstrap interval
    ci_high: float
    p_value: float  # exact two-sided McNemar test on the discordant pairs
    only_baseline: int  # samples the baseline gets right and the run wrong
    only_run: int  # and the other way round
    samples: int


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant counts against 1/2."""
    n = only_a + only_b  # none discordant: a tail of 1, p = 1
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_interval(
    differences: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean of per-sample differences, resampling samples with replacement."""
    rng = np.random.default_rng(seed)
    n = len(differences)
    means = np.empty(resamples)
    for start in range(0, resamples, 250):  # chunks keep memory at 250 x n indices
        stop = min(resamples, start + 250)
        means[start:stop] = differences[rng.integers(0, n, (stop - start, n))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_delta(
    baseline_correct: np.ndarray, run_correct: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES
) -> PairedDelta:
    """Compare two 0/1 correctness vectors over the same samples (same order)."""
    if baseline_correct.shape != run_correct.shape:
        raise ValueError(f"paired runs must cover the same samples ({len(baseline_correct)} vs {len(run_correct)})")
    base, run = baseline_correct.astype(np.int64), run_correct.astype(np.int64)
    differences = (run - base).astype(np.float64)
    low, high = bootstrap_interval(differences, resamples)
    only_baseline, only_run = int(((base == 1) & (run == 0)).sum()), int(((base == 0) & (run == 1)).sum())
    return PairedDelta(
        delta_top1=100 * differences.mean(),
        ci_low=100 * low,
        ci_high=100 * high,
        p_value=mcnemar_exact(only_baseline, only_run),
        only_baseline=only_baseline,
        only_run=only_run,
        samples=len(base),
    )
