"""Sweep reports: one row per run (results.json), swept settings told apart, paired comparisons.

Used by scripts/sweep_report.py; the statistics live in engine/report/stats.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .labels import group_label, short_label, swept_keys  # noqa: F401  (group_label, swept_keys: public here)
from .stats import BOOTSTRAP_RESAMPLES, paired_delta
from .sweep_plots import plot_paired, plot_sweep

COLUMNS = [
    "run",
    "task",
    "dataset",
    "model",
    "checkpoint",
    "registers",
    "schedule",
    "r",
    "protect",
    "prop_attn",
    "top1",
    "top5",
    "images_per_s",
    "gflops",
    "batch_size",
    "dtype",
    "device",
]
PAIRED_COLUMNS = ["delta_top1", "ci_low", "ci_high", "p_value"]
# Settings that make two runs different experiments (batch size, dtype and device do not change predictions).
# `schedule` is the r asked for, or the FLOP budget that chose r (tome.flops): runs at one budget are paired
# even where the cap of each protection mode made the budget choose another r.
IDENTITY = ("task", "dataset", "model", "checkpoint", "registers", "schedule", "protect", "prop_attn")


class ReportError(ValueError):
    """The sweep folder cannot give the report asked for; the message says why."""


def _natural(path: Path) -> list:
    """Job folders 0, 1, ..., 10 in numeric order."""
    return [int(part) if part.isdigit() else part for part in path.parts]


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(sweep_dir.rglob("results.json"), key=_natural):
        record = json.loads(path.read_text())
        row = {"run": str(path.parent.relative_to(sweep_dir))} | {k: record.get(k) for k in COLUMNS[1:]}
        row["r"] = _r_label(row["r"])
        fraction = record.get("flops_fraction")
        row["schedule"] = f"flops={fraction:g}" if fraction is not None else f"r={row['r']}"
        predictions = path.parent / str(record.get("predictions") or "predictions.csv")
        row["_predictions"] = predictions if predictions.exists() else None
        rows.append(row)
    if not rows:
        raise ReportError(f"no results.json under {sweep_dir}; did the sweep's runs finish?")
    return rows


def _r_label(r: Any) -> str:
    return json.dumps(r).replace(" ", "")


def _correct(path: Optional[Path], run: str) -> np.ndarray:
    if path is None:
        raise ReportError(f"run {run} has no predictions.csv; rerun its evaluation (task=eval writes one)")
    with open(path) as f:
        rows = sorted((int(r["index"]), int(r["correct"])) for r in csv.DictReader(f))
    return np.array([c for _, c in rows], dtype=np.int64)


def add_paired(
    rows: list[dict[str, Any]], key: str, baseline: Optional[str], resamples: int = BOOTSTRAP_RESAMPLES
) -> list[dict[str, Any]]:
    """Fill delta_top1, ci_low, ci_high, p_value of every run against its baseline partner.

    Returns pooled rows: per setting (all but `key` and checkpoint), the samples of every checkpoint
    together, when the sweep holds several checkpoints.
    """
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
        if str(row.get(key)) == baseline:
            continue
        partner = partners.get(tuple(json.dumps(row.get(k)) for k in others))
        if partner is None:
            continue
        base, run = _correct(partner["_predictions"], partner["run"]), _correct(row["_predictions"], row["run"])
        result = paired_delta(base, run, resamples)
        row.update(delta_top1=result.delta_top1, ci_low=result.ci_low, ci_high=result.ci_high, p_value=result.p_value)
        pool_key = tuple(json.dumps(row.get(k)) for k in others if k != "checkpoint") + (str(row.get(key)),)
        pooled.setdefault(pool_key, []).append((row, base, run))
    pooled_rows = []
    for members in pooled.values():
        if len(members) < 2:
            continue
        first = members[0][0]
        result = paired_delta(
            np.concatenate([m[1] for m in members]), np.concatenate([m[2] for m in members]), resamples
        )
        pooled_rows.append(
            {
                **{k: first.get(k) for k in COLUMNS},
                "run": f"pooled ({len(members)} checkpoints)",
                "checkpoint": "pooled",
                "top1": None,
                "top5": None,
                "images_per_s": None,
                "delta_top1": result.delta_top1,
                "ci_low": result.ci_low,
                "ci_high": result.ci_high,
                "p_value": result.p_value,
                "_predictions": None,
            }
        )
    return pooled_rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


ALWAYS_SHOWN = ("run", "r", "top1", "top5", "images_per_s", "gflops")


def split_constant_columns(table: list[dict[str, Any]], columns: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The columns whose value differs between rows (plus the measurements), and the constant ones."""
    shown, constant = [], {}
    for column in columns:
        values = {json.dumps(row.get(column), default=str) for row in table}
        if column in ALWAYS_SHOWN or column in PAIRED_COLUMNS or len(values) > 1:
            shown.append(column)
        else:
            constant[column] = table[0].get(column)
    return shown, constant


def _markdown(table: list[dict[str, Any]], columns: list[str]) -> list[str]:
    if all(row.get("schedule") == f"r={row.get('r')}" for row in table):
        columns = [c for c in columns if c != "schedule"]  # every run asked for its r: the r column says it
    shown, constant = split_constant_columns(table, columns)
    header = ", ".join(f"{k} {_fmt(v)}" for k, v in constant.items() if v is not None)
    lines = [f"All runs: {header}.", ""] if header else []
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    return lines + ["| " + " | ".join(_fmt(row.get(c)) for c in shown) + " |" for row in table]


def _write_csv(path: Path, table: list[dict[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: row.get(c) for c in columns} for row in table)


def write_report(
    rows: list[dict[str, Any]], out_dir: Path, paired: Optional[str] = None, baseline: Optional[str] = None
) -> dict[str, Path]:
    """sweep.csv (every column), sweep.md (constant settings in one line above the table) and sweep.png.

    With `paired`, the paired comparison goes beside them, never over them:
    paired_<key>_vs_<baseline>.csv/.md/.png (each other value of `key` against the baseline).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "sweep.csv", "md": out_dir / "sweep.md", "png": out_dir / "sweep.png"}
    _write_csv(paths["csv"], rows, COLUMNS)
    paths["md"].write_text("\n".join(_markdown(rows, COLUMNS)) + "\n")
    plot_sweep(rows, paths["png"])
    if not paired:
        return paths
    pooled = add_paired(rows, paired, baseline)
    baseline = baseline or str(rows[0].get(paired))
    stem = out_dir / f"paired_{paired}_vs_{baseline}"
    paired_rows = [row for row in rows if row.get("delta_top1") is not None] + pooled
    columns = COLUMNS + PAIRED_COLUMNS
    paths |= {
        "paired_csv": stem.with_suffix(".csv"),
        "paired_md": stem.with_suffix(".md"),
        "paired_png": stem.with_suffix(".png"),
    }
    _write_csv(paths["paired_csv"], paired_rows, columns)
    lines = _markdown(paired_rows, columns) + [
        "",
        f"delta_top1: top-1 minus that of the {paired}={baseline} run with the same settings, in points; "
        f"ci: 95% paired bootstrap over samples ({BOOTSTRAP_RESAMPLES} resamples, seed 0); p_value: exact McNemar "
        "test on the samples the two runs disagree on.",
    ]
    paths["paired_md"].write_text("\n".join(lines) + "\n")
    plot_paired(rows + pooled, paired, paths["paired_png"], baseline)
    return paths
