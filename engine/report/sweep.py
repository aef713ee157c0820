"""Sweep reports (scripts/sweep_report.py): one row per run (results.json), the swept settings told apart,
paired comparisons (a bootstrap interval and an exact McNemar test over the same samples), and their figures."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib.figure import Figure

from . import save_figure, write_csv, write_lines

COLUMNS = (
    "run task dataset model checkpoint registers schedule r protect prop_attn top1 top5 images_per_s gflops "
    "batch_size dtype device"
).split()
PAIRED_COLUMNS = ["delta_top1", "ci_low", "ci_high", "p_value"]
ALWAYS_SHOWN = ("run", "r", "top1", "top5", "images_per_s", "gflops")
# Settings that make two runs different experiments (batch size, dtype and device do not change predictions).
# `schedule` is the r asked for, or the FLOP budget that chose r (tome.flops): runs at one budget are paired
# even where the cap of each protection mode made the budget choose another r.
IDENTITY = ("task", "dataset", "model", "checkpoint", "registers", "schedule", "protect", "prop_attn")
SWEPT = ("protect", "prop_attn", "model", "dataset", "checkpoint", "registers")  # what tells runs apart besides r
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


def bootstrap_interval(differences: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of per-sample differences, resampling samples with replacement."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = len(differences)
    means = np.empty(BOOTSTRAP_RESAMPLES)
    for start in range(0, BOOTSTRAP_RESAMPLES, 250):  # chunks keep memory at 250 x n indices
        stop = min(BOOTSTRAP_RESAMPLES, start + 250)
        means[start:stop] = differences[rng.integers(0, n, (stop - start, n))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_delta(baseline_correct: np.ndarray, run_correct: np.ndarray) -> PairedDelta:
    """Compare two 0/1 correctness vectors over the same samples (same order)."""
    if baseline_correct.shape != run_correct.shape:
        raise ValueError(f"paired runs must cover the same samples ({len(baseline_correct)} vs {len(run_correct)})")
    base, run = baseline_correct.astype(np.int64), run_correct.astype(np.int64)
    differences = (run - base).astype(np.float64)
    low, high = bootstrap_interval(differences)
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


class ReportError(ValueError):
    """The sweep folder cannot give the report asked for; the message says why."""


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Settings other than r whose value differs between runs."""
    return [k for k in SWEPT if len({json.dumps(row.get(k)) for row in rows}) > 1]


def short_label(key: str, value: Any) -> str:
    if key == "checkpoint" and value and value != "pooled":
        path = Path(str(value))
        # RUN/checkpoints/last.pt is named by its run folder; any other file by its own name
        return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
    return str(value)


def group_label(row: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={short_label(k, row.get(k))}" for k in keys) or "all runs"


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    paths = sorted(sweep_dir.rglob("results.json"), key=lambda p: [int(s) if s.isdigit() else s for s in p.parts])
    for path in paths:  # job folders 0, 1, ..., 10 in numeric order
        record = json.loads(path.read_text())
        row = {"run": str(path.parent.relative_to(sweep_dir))} | {k: record.get(k) for k in COLUMNS[1:]}
        row["r"] = json.dumps(row["r"]).replace(" ", "")
        fraction = record.get("flops_fraction")
        row["schedule"] = f"flops={fraction:g}" if fraction is not None else f"r={row['r']}"
        predictions = path.parent / str(record.get("predictions") or "predictions.csv")
        row["_predictions"] = predictions if predictions.exists() else None
        rows.append(row)
    if not rows:
        raise ReportError(f"no results.json under {sweep_dir}; did the sweep's runs finish?")
    return rows


def _correct(path: Optional[Path], run: str) -> np.ndarray:
    if path is None:
        raise ReportError(f"run {run} has no predictions.csv; rerun its evaluation (task=eval writes one)")
    with open(path) as f:
        rows = sorted((int(r["index"]), int(r["correct"])) for r in csv.DictReader(f))
    return np.array([c for _, c in rows], dtype=np.int64)


def add_paired(rows: list[dict[str, Any]], key: str, baseline: Optional[str]) -> list[dict[str, Any]]:
    """Fill delta_top1, ci_low, ci_high, p_value of every run against its baseline partner. Returns pooled rows:
    per setting (all but `key` and checkpoint), the samples of every checkpoint together, when there are several."""
    values = list(dict.fromkeys(str(row.get(key)) for row in rows))
    if len(values) < 2:
        raise ReportError(f"--paired {key}: the sweep has only {key}={values[0] if values else None}")
    baseline = values[0] if baseline is None else baseline
    if baseline not in values:
        raise ReportError(f"--baseline {baseline}: {key} takes the values {', '.join(values)} in this sweep")
    others = [k for k in IDENTITY if k != key]
    partners = {tuple(json.dumps(row.get(k)) for k in others): row for row in rows if str(row.get(key)) == baseline}
    pooled: dict[tuple, list] = {}
    for row in rows:
        partner = partners.get(tuple(json.dumps(row.get(k)) for k in others))
        if partner is None or str(row.get(key)) == baseline:
            continue
        base, run = _correct(partner["_predictions"], partner["run"]), _correct(row["_predictions"], row["run"])
        result = paired_delta(base, run)
        row.update({k: getattr(result, k) for k in PAIRED_COLUMNS})
        pool_key = tuple(json.dumps(row.get(k)) for k in others if k != "checkpoint") + (str(row.get(key)),)
        pooled.setdefault(pool_key, []).append((row, base, run))
    pooled_rows = []
    for members in (m for m in pooled.values() if len(m) > 1):
        first, bases, runs = members[0][0], [m[1] for m in members], [m[2] for m in members]
        result = paired_delta(np.concatenate(bases), np.concatenate(runs))
        row = {k: first.get(k) for k in COLUMNS} | {k: getattr(result, k) for k in PAIRED_COLUMNS}
        row |= {"run": f"pooled ({len(members)} checkpoints)", "checkpoint": "pooled", "_predictions": None}
        pooled_rows.append(row | dict.fromkeys(("top1", "top5", "images_per_s")))  # measured per run only
    return pooled_rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown(table: list[dict[str, Any]], columns: list[str]) -> list[str]:
    """A table of the columns whose value differs between rows (and the measurements), the constant ones above it."""
    if all(row.get("schedule") == f"r={row.get('r')}" for row in table):
        columns = [c for c in columns if c != "schedule"]  # every run asked for its r: the r column says it
    shown, constant = [], {}
    for column in columns:
        values = {json.dumps(row.get(column), default=str) for row in table}
        if column in ALWAYS_SHOWN or column in PAIRED_COLUMNS or len(values) > 1:
            shown.append(column)
        else:
            constant[column] = table[0].get(column)
    header = ", ".join(f"{k} {_fmt(v)}" for k, v in constant.items() if v is not None)
    lines = [f"All runs: {header}.", ""] if header else []
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    return lines + ["| " + " | ".join(_fmt(row.get(c)) for c in shown) + " |" for row in table]


def write_report(
    rows: list[dict[str, Any]], out_dir: Path, paired: Optional[str] = None, baseline: Optional[str] = None
) -> dict[str, Path]:
    """sweep.csv (every column), sweep.md (constant settings in one line above the table) and sweep.png. With
    `paired`, the paired comparison goes beside them, never over them: paired_<key>_vs_<baseline>.csv/.md/.png
    (each other value of `key` against the baseline)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"sweep.{ext}" for ext in ("csv", "md", "png")}
    write_csv(paths["csv"], rows, COLUMNS)
    write_lines(paths["md"], _markdown(rows, COLUMNS))
    plot_sweep(rows, paths["png"])
    if not paired:
        return paths
    pooled = add_paired(rows, paired, baseline)
    baseline = baseline or str(rows[0].get(paired))
    # a file name for any value: a checkpoint by its run's name, brackets and slashes out (`[4,-1.0]`: 4,-1.0)
    stem = f"paired_{paired}_vs_" + re.sub(r"[^\w.,=+-]+", "_", short_label(paired, baseline)).strip("_")
    paths |= {f"paired_{ext}": out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "png")}
    paired_rows = [row for row in rows if row.get("delta_top1") is not None] + pooled
    write_csv(paths["paired_csv"], paired_rows, COLUMNS + PAIRED_COLUMNS)
    lines = _markdown(paired_rows, COLUMNS + PAIRED_COLUMNS) + [
        "",
        f"delta_top1: top-1 minus that of the {paired}={baseline} run with the same settings, in points; "
        f"ci: 95% paired bootstrap over samples ({BOOTSTRAP_RESAMPLES} resamples, seed 0); p_value: exact McNemar "
        "test on the samples the two runs disagree on.",
    ]
    write_lines(paths["paired_md"], lines)
    plot_paired(rows + pooled, paired, paths["paired_png"], baseline)
    return paths


def _title(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    return (
        f"{first.get('model', '')} on {first.get('dataset', '')}\n({first.get('device', '')}, "
        f"batch {first.get('batch_size', '')}, {first.get('dtype', '')})"
    )


def _point_label(row: dict[str, Any], with_r: bool = True) -> str:
    """'r=4', or for a run whose r a FLOP budget chose, 'flops=0.33' and with_r ' (r=[12,-1.0])'."""
    schedule = str(row.get("schedule") or f"r={row['r']}")
    return schedule if schedule.startswith("r=") or not with_r else f"{schedule} (r={row['r']})"


def _merging_order(row: dict[str, Any]) -> tuple:
    """Less merging first: more GFLOPs (what r takes away, counted, not timed), then the smaller r asked."""
    r = str(row["r"])
    return (-(row.get("gflops") or 0.0), (0, int(r), "") if r.isdigit() else (1, 0, r))


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 against images/s, one line per combination of swept settings besides r, r written at each point.
    A line walks from the least merging to the most, whatever order the measured images/s put them in."""
    keys = swept_keys(rows)
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["top1"] is not None and row["images_per_s"] is not None:
            lines.setdefault(group_label(row, keys), []).append(row)
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    for g, (label, members) in enumerate(lines.items()):
        members.sort(key=_merging_order)
        (line,) = ax.plot([m["images_per_s"] for m in members], [m["top1"] for m in members], "o-", label=label)
        for m in members:  # one side per line: labels of different lines do not sit on each other
            xy, offset = (m["images_per_s"], m["top1"]), (5, 6 if g % 2 == 0 else -12)
            ax.annotate(
                _point_label(m), xy, textcoords="offset points", xytext=offset, fontsize=7, color=line.get_color()
            )
    ax.set(xlabel="images / s", ylabel="top-1 accuracy (%)")
    ax.set_title(_title(rows), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_paired(rows: list[dict[str, Any]], key: str, path: Path, baseline: str) -> None:
    """Delta top-1 with its 95% interval against GFLOPs, one series per compared value and checkpoint."""
    compared = [r for r in rows if r.get("delta_top1") is not None]
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    series: dict[str, list[dict[str, Any]]] = {}
    for row in compared:
        label = f"{key}={row.get(key)}, {short_label('checkpoint', row.get('checkpoint'))}"
        series.setdefault(label, []).append(row)
    labelled: set[str] = set()
    for i, (label, members) in enumerate(series.items()):
        members = sorted(members, key=lambda r: -r["gflops"])
        x = [m["gflops"] * (1 + 0.004 * (i - len(series) / 2)) for m in members]  # small dodge
        y = [m["delta_top1"] for m in members]
        err = [[m["delta_top1"] - m["ci_low"] for m in members], [m["ci_high"] - m["delta_top1"] for m in members]]
        style = {"fmt": "o-", "lw": 2, "ms": 5} if "pooled" in label else {"fmt": "o:", "lw": 1, "ms": 3}
        ax.errorbar(x, y, yerr=err, capsize=3, label=label, **style)
        for m, xi, yi, high in zip(members, x, y, err[1]):  # each schedule named once, above its interval
            name = _point_label(m, with_r=False)  # at one budget each mode may run another r
            if name not in labelled:
                labelled.add(name)
                ax.annotate(name, (xi, yi + high), textcoords="offset points", xytext=(0, 4), fontsize=6, ha="center")
    ax.axhline(0, color="grey", lw=0.8)
    ax.invert_xaxis()  # more merging to the right
    ax.set_xlabel("GFLOPs per image (more merging to the right)")
    ax.set_ylabel(f"delta top-1 vs {key}={baseline} (points, 95% CI)")
    ax.set_title(_title(compared or rows), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
